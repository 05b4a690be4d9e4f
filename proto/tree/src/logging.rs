//! The one logging policy: `tracing` events with structured fields, written to stderr.
//! Daemons log at `info` unless `RUST_LOG` says otherwise; command-line tools are quiet
//! (`warn`) by default, since what they print on stdout is their answer.

/// Installs the stderr subscriber with `default` as the filter when `RUST_LOG` is unset.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A second call (a test harness that already installed one) keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
