# runctl developer recipes. `just` lists them.

set dotenv-load := false

py := if path_exists(".venv/bin/python") == "true" { ".venv/bin/python" } else { "python3" }

# list the recipes (with this same just: it need not be on PATH, e.g. .venv/bin/just)
default:
    @{{just_executable()}} --list

# install runctl with its dev tools into .venv
setup:
    python3 -m venv .venv
    .venv/bin/pip install -e '.[dev]'

# run nats-server (JetStream on) in the foreground with nats.conf
up *args:
    {{py}} -m runctl up {{args}}

# embedded server + a few ranks of a training-like loop + the HTTP gateway
demo *args:
    {{py}} -m runctl demo {{args}}

# the whole test suite (starts real nats-server processes)
test *args:
    {{py}} -m pytest {{args}}

# ruff and mypy
lint:
    {{py}} -m ruff check .
    {{py}} -m ruff format --check .
    {{py}} -m mypy

# benchmarks: print tables, write JSON to bench/results/
bench *args:
    {{py}} -m bench {{args}}

# 60 s soak: mixed HTTP load while ranks log steps; fails on any error or memory growth
soak *args:
    {{py}} -m bench.soak {{args}}

# refresh the console's screenshots in docs/img (runs the demo, photographs it in chromium)
screenshots *args:
    {{py}} docs/screenshots.py {{args}}

# PYTHONPATH is dropped so the tests import the mutated copy, not the checkout; results
# stay in mutants/ (resumable); `just mutate "runctl.agent.state*"` runs a subset.
# mutation testing (mutmut) of the state, client and step log: survivors in docs/reliability.md
mutate *names:
    env -u PYTHONPATH {{py}} -m mutmut run --max-children 2 {{names}}
    env -u PYTHONPATH {{py}} -m mutmut results
