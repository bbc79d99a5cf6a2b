//! Worker identity: unique per process start, used as the consumer name in the group.

/// `host:pid:name:random` — unique per process start even when a pid is reused.
pub fn worker_identity(worker_name: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let suffix: u32 = rand::random();
    format!("{host}:{}:{worker_name}:{suffix:08x}", std::process::id())
}

#[cfg(test)]
mod tests {
    #[test]
    fn identities_differ_within_one_process() {
        let a = super::worker_identity("w");
        let b = super::worker_identity("w");
        assert_ne!(a, b);
        assert!(a.contains(&format!(":{}:w:", std::process::id())));
    }
}
