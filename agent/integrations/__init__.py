"""Optional integrations with training frameworks (the ``distributed`` extra).

Each lives in its own module and is imported only when used, so ``import runctl`` never
imports torch or lightning::

    from runctl.agent.integrations.lightning import RunctlCallback
"""

__all__: list[str] = []
