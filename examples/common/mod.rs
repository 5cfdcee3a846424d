//! What the benchmark clients share (not an example of its own: Cargo only
//! takes `examples/<name>/main.rs` from folders).

/// The comma-separated levels argument (`100,500,1000`), or `default`.
pub fn levels(arg: Option<String>, default: &str) -> Vec<usize> {
    arg.unwrap_or_else(|| default.into()).split(',').map(|n| n.trim().parse().expect("levels are numbers")).collect()
}

/// A process's resident memory in KiB (`VmRSS`), 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
