//! The HTTP server: the listener, the router (which route goes to which
//! handler, which routes need credentials), graceful shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{delete, get, post};
use axum::Router;
use tern_broker::{Broker, ConnectionId};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::auth::{self, Authenticator, BrokerUsers, SharedAuthenticator};
use crate::metrics::{self, MetricsSource};
use crate::rates::{self, Rates};
use crate::redrive::Redrives;
use crate::{api, dashboard, error, openapi};

/// How long [`HttpServer::shutdown`] waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the server authenticates and where its metrics come from.
///
/// The default checks the broker's own users ([`BrokerUsers`]), without a
/// bearer token and without a metrics recorder: `/metrics` then shows only
/// the per-queue gauges read from the broker at scrape time.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// `None`: [`BrokerUsers`] over the served broker.
    authenticator: Option<SharedAuthenticator>,
    bearer_token: Option<BearerToken>,
    metrics: Option<MetricsSource>,
    /// Time between message-rate samples; `None`: 5 s.
    rate_interval: Option<Duration>,
}

/// A bearer token, never printed.
#[derive(Clone)]
struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl HttpConfig {
    /// Checks credentials with `authenticator` instead of the broker's users.
    pub fn with_authenticator(mut self, authenticator: impl Authenticator) -> HttpConfig {
        self.authenticator = Some(Arc::new(authenticator));
        self
    }

    /// Accepts `Authorization: Bearer <token>` as an administrator, besides
    /// the broker's users (see [`BrokerUsers::with_bearer_token`]; ignored
    /// with a custom authenticator).
    pub fn with_bearer_token(mut self, token: impl Into<String>) -> HttpConfig {
        self.bearer_token = Some(BearerToken(token.into()));
        self
    }

    /// Renders the process's metrics recorder on `/metrics`.
    pub fn with_metrics(mut self, metrics: MetricsSource) -> HttpConfig {
        self.metrics = Some(metrics);
        self
    }

    /// Samples message counters and queue depths every `interval` for
    /// the rates and their history (default 5 s; at least 10 ms).
    pub fn with_rate_interval(mut self, interval: Duration) -> HttpConfig {
        self.rate_interval = Some(interval.max(Duration::from_millis(10)));
        self
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    inner: Arc<StateInner>,
}

#[derive(Debug)]
struct StateInner {
    broker: Broker,
    /// The identity the API acts under: it owns nothing exclusive, so
    /// another connection's exclusive queue is locked to it (409).
    connection: ConnectionId,
    started: Instant,
    config: HttpConfig,
    authenticator: SharedAuthenticator,
    redrives: Redrives,
    rates: Rates,
    /// Becomes true when the server starts shutting down: endless
    /// responses (the event stream) end then.
    closing: watch::Receiver<bool>,
}

impl AppState {
    pub(crate) fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    pub(crate) fn connection(&self) -> ConnectionId {
        self.inner.connection
    }

    pub(crate) fn started(&self) -> Instant {
        self.inner.started
    }

    pub(crate) fn authenticator(&self) -> &dyn Authenticator {
        self.inner.authenticator.as_ref()
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.clone()
    }

    pub(crate) fn redrives(&self) -> &Redrives {
        &self.inner.redrives
    }

    pub(crate) fn rates(&self) -> &Rates {
        &self.inner.rates
    }

    pub(crate) fn metrics(&self) -> Option<&MetricsSource> {
        self.inner.config.metrics.as_ref()
    }
}

/// Every route: the API behind authentication, then the open ones (the
/// OpenAPI document, the dashboard's page and assets, and `/metrics`, which
/// Prometheus scrapes without credentials, as RabbitMQ's Prometheus
/// endpoint allows).
fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/overview", get(api::overview))
        .route("/api/rates", get(api::rates))
        .route("/api/vhosts", get(api::list_vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(api::get_vhost)
                .put(api::put_vhost)
                .delete(api::delete_vhost),
        )
        .route("/api/whoami", get(api::whoami))
        .route("/api/users", get(api::list_users))
        .route(
            "/api/users/{name}",
            get(api::get_user)
                .put(api::put_user)
                .delete(api::delete_user),
        )
        .route("/api/users/{name}/permissions", get(api::user_permissions))
        .route(
            "/api/vhosts/{vhost}/permissions",
            get(api::vhost_permissions),
        )
        .route("/api/permissions", get(api::list_permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(api::get_permission)
                .put(api::put_permission)
                .delete(api::delete_permission),
        )
        .route("/api/exchanges", get(api::list_all_exchanges))
        .route("/api/exchanges/{vhost}", get(api::list_exchanges))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(api::get_exchange)
                .put(api::put_exchange)
                .delete(api::delete_exchange),
        )
        .route("/api/exchanges/{vhost}/{name}/publish", post(api::publish))
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(api::exchange_source_bindings),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(api::exchange_destination_bindings),
        )
        .route("/api/queues", get(api::list_all_queues))
        .route("/api/queues/{vhost}", get(api::list_queues))
        .route(
            "/api/queues/{vhost}/{name}",
            get(api::get_queue)
                .put(api::put_queue)
                .delete(api::delete_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            delete(api::purge_queue),
        )
        .route("/api/queues/{vhost}/{name}/get", post(api::get_messages))
        .route(
            "/api/queues/{vhost}/{name}/offsets",
            get(api::stream_offsets),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/partitions",
            get(api::super_stream_partitions),
        )
        .route(
            "/api/queues/{vhost}/{name}/bindings",
            get(api::queue_bindings),
        )
        .route("/api/connections", get(api::list_connections))
        .route(
            "/api/connections/{name}",
            get(api::get_connection).delete(api::close_connection),
        )
        .route("/api/channels", get(api::list_channels))
        .route("/api/consumers", get(api::list_all_consumers))
        .route("/api/consumers/{vhost}", get(api::list_consumers))
        .route("/api/events", get(api::events))
        .route("/api/traces/{correlation_id}", get(api::get_trace))
        .route(
            "/api/trace-settings",
            get(api::get_trace_settings).put(api::put_trace_settings),
        )
        .route("/api/dlq", get(api::list_dlqs))
        .route(
            "/api/queues/{vhost}/{name}/messages",
            get(api::peek_messages),
        )
        .route(
            "/api/queues/{vhost}/{name}/redrive",
            post(api::start_redrive),
        )
        .route("/api/redrives", get(api::list_redrives))
        .route("/api/redrives/{id}", get(api::get_redrive))
        .route("/api/bindings", get(api::list_all_bindings))
        .route("/api/bindings/{vhost}", get(api::list_bindings))
        .route(
            "/api/bindings/{vhost}/e/{source}/q/{destination}",
            get(api::list_queue_bindings).post(api::bind_queue),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/q/{destination}/{props}",
            get(api::get_queue_binding).delete(api::unbind_queue),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/e/{destination}",
            get(api::list_exchange_bindings).post(api::bind_exchange),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/e/{destination}/{props}",
            get(api::get_exchange_binding).delete(api::unbind_exchange),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ));
    let open = Router::new()
        .route("/api/openapi.json", get(openapi::serve))
        .route("/metrics", get(metrics::serve))
        .route("/", get(dashboard::index))
        .route("/ui/app.js", get(dashboard::script))
        .route("/ui/app.css", get(dashboard::style))
        .route("/ui/vendor/uPlot.iife.min.js", get(dashboard::uplot_script))
        .route("/ui/vendor/uPlot.min.css", get(dashboard::uplot_style));
    api.merge(open)
        .fallback(api::no_route)
        .layer(axum::middleware::from_fn(error::json_errors))
        .with_state(state)
}

/// The management HTTP server over a [`Broker`]. Dropping it stops the
/// server abruptly; [`HttpServer::shutdown`] lets requests in flight finish.
#[derive(Debug)]
pub struct HttpServer {
    local: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl HttpServer {
    /// Binds `addr` and starts serving on the current tokio runtime. Port 0
    /// picks a free port; see [`HttpServer::local_addr`].
    pub async fn bind(
        addr: SocketAddr,
        broker: Broker,
        config: HttpConfig,
    ) -> io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (closing_tx, closing) = watch::channel(false);
        let authenticator = match &config.authenticator {
            Some(a) => Arc::clone(a),
            None => {
                let mut users = BrokerUsers::new(broker.clone());
                if let Some(token) = &config.bearer_token {
                    users = users.with_bearer_token(token.0.clone());
                }
                Arc::new(users)
            }
        };
        let rates = Rates::new(config.rate_interval.unwrap_or(rates::DEFAULT_INTERVAL));
        rates.spawn(broker.clone(), config.metrics.clone(), closing.clone());
        let state = AppState {
            inner: Arc::new(StateInner {
                authenticator,
                connection: broker.new_connection_id(),
                broker,
                started: Instant::now(),
                config,
                redrives: Redrives::default(),
                rates,
                closing,
            }),
        };
        let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                    let _ = closing_tx.send(true);
                })
                .await
        });
        Ok(HttpServer {
            local,
            stop: Some(stop),
            task,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting, lets requests in flight finish (idle keep-alive
    /// connections are closed at once), and returns when the server has
    /// stopped, or after a few seconds of grace, when it is cut off.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
