//! API documentation pages. Swagger UI's assets come from the
//! utoipa-swagger-ui `vendored` feature and ReDoc's script is embedded from
//! the npm package, so both pages work with no internet access.

use std::sync::Arc;

use axum::{
    Router,
    http::header,
    response::{Html, IntoResponse},
    routing::get,
};
use utoipa::{
    Modify,
    openapi::{
        OpenApi,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_swagger_ui::{Config, SwaggerUi};

use super::AppState;

static REDOC_BUNDLE: &str = include_str!("../../assets/vendor/redoc/redoc.standalone.js");

/// The bundle as served: its sidebar footer shows Redocly's logo from their
/// CDN (no option turns it off), which our no-CDN rule and the page's CSP
/// refuse; an empty inline image stands in for it.
static REDOC_JS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    REDOC_BUNDLE.replace(
        "https://cdn.redoc.ly/redoc/logo-mini.svg",
        "data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27/%3E",
    )
});

const REDOC_PAGE: &str = r#"<!DOCTYPE html>
<html>
  <head>
    <title>Palaver API</title>
    <meta charset="utf-8"/>
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <style>body { margin: 0; padding: 0; }</style>
  </head>
  <body>
    <redoc spec-url="/openapi.json"></redoc>
    <script src="/redoc/redoc.standalone.js"></script>
  </body>
</html>
"#;

/// Declares the Bearer scheme the `security(("bearer" = []))` paths name.
pub struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// `/openapi.json`, `/docs` (Swagger UI) and `/redoc`.
pub fn routes(openapi: OpenApi) -> Router<Arc<AppState>> {
    Router::new()
        // No online validator badge: the page would call validator.swagger.io.
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi).config(Config::default().validator_url("none")))
        .route("/redoc", get(|| async { Html(REDOC_PAGE) }))
        .route(
            "/redoc/redoc.standalone.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "application/javascript"),
                        (header::CACHE_CONTROL, "public, max-age=86400"),
                    ],
                    REDOC_JS.as_str(),
                )
                    .into_response()
            }),
        )
}

/// The OpenAPI document, as `palaver openapi` prints it.
pub fn openapi_json() -> String {
    let (_, openapi) = super::api_routes().split_for_parts();
    openapi.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
