// The typed docs pages' Swagger UI (runctl.gateway.run_docs): the spec named by the page,
// every request (the spec's too) with the bearer token the console keeps in sessionStorage.
(function () {
  var el = document.getElementById('swagger-ui');
  SwaggerUIBundle({
    url: el.getAttribute('data-spec'),
    dom_id: '#swagger-ui',
    deepLinking: true,
    tryItOutEnabled: true,
    requestInterceptor: function (req) {
      var tok = sessionStorage.getItem('runctl-token');
      if (tok && !req.headers.Authorization) { req.headers.Authorization = 'Bearer ' + tok; }
      return req;
    }
  });
})();
