//! OpenTelemetry traces (`--features otlp`): the node's spans — `session` per connection,
//! `request` per HTTP request, `link` per backbone peer link, with their ids as fields — go
//! to an OTLP/HTTP collector (protobuf), batched, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The exporter reads the standard variables
//! (`OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`, 3 s by default here); the service name is
//! `tern` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names it. Only
//! `http://` endpoints (anything else is refused at start). At exit the last spans get 3 s.
//! `RUST_LOG` filters spans as it filters log lines.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;

/// How long the exit waits for the last spans to go out (an unreachable collector must not
/// hold the process past its stop grace).
const FLUSH_AT_EXIT: Duration = Duration::from_secs(3);

/// One export's time limit, unless `OTEL_EXPORTER_OTLP_TIMEOUT` (or `…_TRACES_TIMEOUT`) says.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Flushes and stops the exporter when dropped (at the end of `main`), waiting at most
/// [`FLUSH_AT_EXIT`].
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        let provider = self.0.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(provider.shutdown());
        });
        match rx.recv_timeout(FLUSH_AT_EXIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("tern: OTLP trace export did not finish: {e}"),
            Err(_) => eprintln!(
                "tern: OTLP trace export still busy after {FLUSH_AT_EXIT:?}; the last spans are dropped"
            ),
        }
    }
}

/// The layer that exports spans, and its guard; `None` without an endpoint. Must be called
/// within the tokio runtime.
pub fn layer<S>() -> anyhow::Result<Option<(impl Layer<S>, Guard)>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let endpoints = [var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), var("OTEL_EXPORTER_OTLP_ENDPOINT")];
    let Some(endpoint) = endpoints.into_iter().flatten().next() else {
        return Ok(None);
    };
    // The exporter's HTTP client speaks plain HTTP only; anything else would lose every span
    // without a word.
    if !endpoint.starts_with("http://") {
        anyhow::bail!(
            "OTLP endpoint {endpoint}: only http:// is supported (send to an OpenTelemetry \
             Collector beside the node, which can forward over TLS)"
        );
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if var("OTEL_EXPORTER_OTLP_TIMEOUT").is_none()
        && var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_none()
    {
        builder = builder.with_timeout(EXPORT_TIMEOUT);
    }
    let exporter = builder.build()?;
    // The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; `tern` when neither
    // names the service.
    let named = var("OTEL_SERVICE_NAME").is_some()
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let resource = if named {
        opentelemetry_sdk::Resource::builder().build()
    } else {
        opentelemetry_sdk::Resource::builder().with_service_name("tern").build()
    };
    // Batched on the node's tokio runtime (the exporter's hyper client needs it): call this
    // inside the runtime, and drop the guard before the runtime.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let provider =
        SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tern"));
    Ok(Some((layer, Guard(provider))))
}
