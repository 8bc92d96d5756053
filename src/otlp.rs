//! OpenTelemetry traces (`--features otlp`): the node's spans — `session` per connection,
//! `request` per HTTP request, `link` per backbone peer link, with their ids as fields — go
//! to an OTLP/HTTP collector (protobuf), batched, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The exporter reads the standard variables
//! (`OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`); the service name is `tern` unless
//! `OTEL_SERVICE_NAME` says otherwise. `RUST_LOG` filters spans as it filters log lines.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("tern: OTLP trace export did not finish: {e}");
        }
    }
}

/// The layer that exports spans, and its guard; `None` without an endpoint. Must be called
/// within the tokio runtime.
pub fn layer<S>() -> anyhow::Result<Option<(impl Layer<S>, Guard)>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "tern".to_owned());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
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
