//! Structured logs: JSON lines in production, readable `key=value` lines in
//! development. Handlers never log credentials; the access log names the
//! matched route, not the raw URI (which may carry `?token=`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, ServerSettings};

pub fn init(settings: &ServerSettings) {
    let filter = EnvFilter::try_new(&settings.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.log_format() {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false))
            .try_init(),
        LogFormat::Text => registry
            .with(fmt::layer().compact().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())))
            .try_init(),
    };
    // Already initialised (e.g. by an embedding program): keep theirs.
    let _ = result;
}
