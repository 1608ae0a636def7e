//! W3C trace context across HTTP, cluster calls, sagas and Raft: one trace id from a client's
//! request to the last message it causes, on whatever nodes that work crosses.
//!
//! A trace context travels as a `traceparent` string (`00-<trace id>-<parent span id>-<flags>`):
//! in the HTTP header, in every cluster envelope ([`crate::wire`]), and in a capability's record (so
//! work it does later, such as a saga's steps, stays in the request's trace). Logs carry
//! the trace id as the `trace_id` field of the span they run in.
//!
//! When the node exports spans (OpenTelemetry, `[telemetry] otlp_endpoint`), the string and the
//! span tree agree: [`link`] makes a span the child of the context a traceparent names, and
//! [`outgoing`] names that span as the parent of what is sent next. Without an exporter the same
//! calls cost nothing and the trace id still flows: `outgoing` then keeps the trace id and draws a
//! new span id ([`child_traceparent`]).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A traceparent's parts, checked as the W3C Trace Context spec asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

/// Parses a `traceparent` header value. `None` for anything the spec says to ignore: a bad
/// length or character, version `ff`, an all-zero trace or span id, or (version 00) extra parts.
pub fn parse(value: &str) -> Option<Parent> {
    // Runs for every cluster call (`outgoing`): no allocation.
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Parent { trace_id, span_id, sampled: flags & 1 == 1 })
}

/// A fresh traceparent: a new trace, sampled.
pub fn new_traceparent() -> String {
    format(rand::random::<u128>() | 1, rand::random::<u64>() | 1, true)
}

/// The same trace with a new span id (and the parent's sampling): what a callee sends on. A
/// traceparent that does not parse (a peer's, say) starts a new trace instead.
pub fn child_traceparent(parent: &str) -> String {
    match parse(parent) {
        Some(p) => format(p.trace_id, rand::random::<u64>() | 1, p.sampled),
        None => new_traceparent(),
    }
}

/// The trace id of a traceparent, for log fields; `-` for one that does not parse.
pub fn trace_id(traceparent: &str) -> &str {
    match parse(traceparent) {
        Some(_) => traceparent.trim().get(3..35).unwrap_or("-"),
        None => "-",
    }
}

fn format(trace_id: u128, span_id: u64, sampled: bool) -> String {
    format!("00-{trace_id:032x}-{span_id:016x}-{:02x}", u8::from(sampled))
}

/// Makes `span` a child of the context `traceparent` names (for the exported span tree). A
/// traceparent that does not parse leaves the span where it is.
pub fn link(span: &tracing::Span, traceparent: &str) {
    let Some(p) = parse(traceparent) else { return };
    let flags = if p.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let remote = SpanContext::new(
        TraceId::from_bytes(p.trace_id.to_be_bytes()),
        SpanId::from_bytes(p.span_id.to_be_bytes()),
        flags,
        true,
        TraceState::default(),
    );
    // Fails only when no OpenTelemetry layer is installed: nothing is exported then.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The traceparent to send from inside `span`: the span itself as parent when it is exported,
/// else the same trace as `traceparent` with a new span id.
pub fn outgoing(span: &tracing::Span, traceparent: &str) -> String {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        let trace = u128::from_be_bytes(sc.trace_id().to_bytes());
        let span_id = u64::from_be_bytes(sc.span_id().to_bytes());
        format(trace, span_id, sc.is_sampled())
    } else {
        child_traceparent(traceparent)
    }
}

/// A span named `name` in the trace of `traceparent`, and the traceparent to send from inside it.
///
/// At debug level: the node's log (info) does not pay for the dozens of spans an order makes
/// (measured: 19 % of a node's throughput); they exist when spans are exported (the exporter's
/// filter takes them) or `RUST_LOG` asks for debug. Lines logged at info name their trace
/// themselves (`trace_id`).
#[macro_export]
macro_rules! traced_span {
    ($name:literal, $traceparent:expr $(, $($field:tt)*)?) => {{
        let tp: &str = $traceparent;
        let span = tracing::debug_span!($name, trace_id = %$crate::trace::trace_id(tp) $(, $($field)*)?);
        $crate::trace::link(&span, tp);
        let out = $crate::trace::outgoing(&span, tp);
        (span, out)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_parses_and_its_trace_is_continued() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = parse(tp).expect("valid");
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
        let ours = child_traceparent(tp);
        assert_eq!(trace_id(&ours), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(ours, tp, "our span id is our own");
        assert!(parse(&ours).is_some());
        // A later version's traceparent is continued too (its extra parts dropped).
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future";
        assert_eq!(trace_id(&child_traceparent(v1)), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parse(&child_traceparent(v1)).map(|p| p.sampled), Some(false));
    }

    #[test]
    fn what_the_spec_says_to_ignore_starts_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
            assert_eq!(trace_id(bad), "-");
            let fresh = child_traceparent(bad);
            assert!(parse(&fresh).is_some());
            assert_ne!(trace_id(&fresh), "4bf92f3577b34da6a3ce929d0e0e4736");
        }
        // A later version may append parts.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future").is_some());
    }

    #[test]
    fn without_an_exporter_outgoing_keeps_the_trace() {
        let tp = new_traceparent();
        let (span, out) = traced_span!("test", &tp);
        drop(span);
        assert_eq!(trace_id(&out), trace_id(&tp));
        assert!(parse(&out).is_some());
    }
}
