//! The web dashboard: one HTML page, its script and its style sheet, and
//! the vendored uPlot chart library (`dashboard/vendor/`, MIT, from the npm
//! registry unchanged), embedded in the binary at build time (no CDN, no
//! Node.js build step).
//! The page is served without credentials; it asks for them and sends them
//! with every API call it makes.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");
const UPLOT_SCRIPT: &str = include_str!("dashboard/vendor/uPlot.iife.min.js");
const UPLOT_STYLE: &str = include_str!("dashboard/vendor/uPlot.min.css");

/// Only this server's own scripts, styles and API: nothing from elsewhere
/// runs on the page, even if a queue name carried markup.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// `GET /`: the dashboard page.
pub(crate) async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/app.js`.
pub(crate) async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/app.css`.
pub(crate) async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /ui/vendor/uPlot.iife.min.js`: the chart library.
pub(crate) async fn uplot_script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", UPLOT_SCRIPT)
}

/// `GET /ui/vendor/uPlot.min.css`.
pub(crate) async fn uplot_style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", UPLOT_STYLE)
}
