//! A node's logs, span export and metrics recorder, set up once at start from `[log]` and
//! `[telemetry]`.
//!
//! - Logs: tracing-subscriber's `fmt`, as text or as one JSON object per line (event fields at
//!   the top level, the current span under `span` and every enclosing one under `spans`: a
//!   request's `trace_id` and `request_id` ride on every line logged inside it, however deep).
//!   `RUST_LOG` filters, as before.
//! - Spans: with `otlp_endpoint`, tracing-opentelemetry turns the node's spans (HTTP requests,
//!   cluster calls and their serving side, saga steps, Raft proposals) into OpenTelemetry spans,
//!   batched to the collector over OTLP/HTTP by a thread of the SDK's own (an unreachable
//!   collector costs dropped spans, never a stalled request).
//! - Metrics: the histogram recorder behind `/metrics` (`bulkhead_http::metrics::install`).
//!
//! Caveats: the exporter speaks plain HTTP only (no TLS client is built in; run a collector
//! agent on the host); spans are sampled by the caller's `traceparent` flag or, for a trace that
//! starts here, always.

use bulkhead_launch::config::{LogFormat, NodeConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How long the exit waits for spans still batched, after the drain (counted in its bound,
/// `lifecycle::Bounds::total`).
pub const SPAN_FLUSH_BOUND: std::time::Duration = std::time::Duration::from_secs(3);

/// What must be flushed before the process exits.
pub struct Telemetry {
    spans: Option<SdkTracerProvider>,
}

const DEFAULT_FILTER: &str = "info,ractor=warn,ractor_cluster=warn,openraft=warn";

/// Logs for commands without a node config (text, `RUST_LOG` or info).
pub fn init_plain() {
    let _ = tracing_subscriber::fmt().with_env_filter(filter()).with_target(false).with_ansi(ansi()).try_init();
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// Colours only on a terminal: a node's log usually goes to a file or journald.
fn ansi() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Sets up logs, span export and the metrics recorder for the node `cfg` describes. Call once,
/// inside the runtime.
pub fn init(cfg: &NodeConfig) -> Result<Telemetry, String> {
    let spans = match cfg.telemetry.otlp_endpoint.as_deref() {
        Some(endpoint) => Some(otlp(endpoint, &cfg.name)?),
        None => None,
    };
    // Each layer filters for itself: the log at `RUST_LOG` (info), the exporter every span of
    // ours (most are debug, so the log does not pay for them) and events from info up.
    let otel = spans
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("bulkhead")).with_filter(filter_fn(exported)));
    let log: Box<dyn Layer<Registry> + Send + Sync> = match cfg.log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi()).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(log.with_filter(filter()))
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    bulkhead_http::metrics::install()?;
    log_panics();
    if let Some(endpoint) = cfg.telemetry.otlp_endpoint.as_deref() {
        tracing::info!(endpoint, "exporting spans over OTLP/HTTP");
    }
    Ok(Telemetry { spans })
}

/// Writes every panic to stderr at once (one line: thread, location, message, as the default
/// hook does), and resolves its backtrace (when `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` asks for
/// one) on a thread of its own.
///
/// Why not the default hook: it resolves the backtrace against this binary's debug info before it
/// returns, and the panicking worker unwinds, and its supervisor restarts it, only after the hook
/// returns: 260-850 ms measured here, for a restart that itself takes 30 µs. Capturing the frames
/// is cheap; resolving them is what takes the time, so only that moves off the panicking thread.
/// Not through `tracing`: a panic inside a subscriber's own callback would wait on a lock the
/// panicking thread holds. One backtrace is resolved at a time (std holds a lock while it
/// resolves, which would stall the next panic's capture); a panic meanwhile logs none.
fn log_panics() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static RESOLVING: AtomicBool = AtomicBool::new(false);
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        let _ = writeln!(std::io::stderr(), "thread '{thread}' panicked at {location}: {message}");
        if RESOLVING.swap(true, Ordering::AcqRel) {
            return;
        }
        let frames = std::backtrace::Backtrace::capture();
        if frames.status() != std::backtrace::BacktraceStatus::Captured {
            RESOLVING.store(false, Ordering::Release);
            return;
        }
        let spawned = std::thread::Builder::new().name("panic-backtrace".into()).spawn(move || {
            let text = frames.to_string();
            let _ = writeln!(std::io::stderr(), "backtrace of the panic in '{thread}' at {location}:\n{text}");
            RESOLVING.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            RESOLVING.store(false, Ordering::Release);
        }
    }));
}

/// What the span exporter takes: the node's own spans down to debug (calls, serving, saga steps,
/// proposals), and events from info up (they become span events).
fn exported(meta: &Metadata<'_>) -> bool {
    if meta.is_span() {
        meta.target().starts_with("bulkhead") && *meta.level() <= Level::DEBUG
    } else {
        *meta.level() <= Level::INFO
    }
}

/// The SDK's exporter and batch processor. Built on a plain thread: its blocking HTTP client may
/// not be made (or dropped) on a runtime thread.
fn otlp(endpoint: &str, node: &str) -> Result<SdkTracerProvider, String> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let node = node.to_string();
    std::thread::spawn(move || -> Result<SdkTracerProvider, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .build()
            .map_err(|e| format!("telemetry.otlp_endpoint {url}: {e}"))?;
        let resource = Resource::builder()
            .with_service_name("bulkhead")
            .with_attribute(opentelemetry::KeyValue::new("service.instance.id", node))
            .build();
        Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    })
    .join()
    .map_err(|_| "building the span exporter panicked".to_string())?
}

impl Telemetry {
    /// Sends the spans still batched (bounded by the SDK's export timeout), off the runtime.
    pub async fn shutdown(self) {
        if let Some(p) = self.spans {
            let done = tokio::task::spawn_blocking(move || p.shutdown());
            match tokio::time::timeout(SPAN_FLUSH_BOUND, done).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "span export did not finish"),
                Err(_) => tracing::warn!("span export still running after {SPAN_FLUSH_BOUND:?}; exiting without it"),
                Ok(_) => {}
            }
        }
    }
}
