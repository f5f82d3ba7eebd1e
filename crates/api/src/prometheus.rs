//! Metrics text: what `promtool check metrics` (the Prometheus text format 0.0.4) accepts.

/// prometheus-client writes OpenMetrics, where a counter's HELP and TYPE
/// name the family (`x`) and samples are `x_total`. The Prometheus text
/// format (what `promtool check metrics` checks, version 0.0.4) wants
/// HELP and TYPE on `x_total`, and no `# EOF`.
pub fn to_text_format(open_metrics: &str) -> String {
    let counters: Vec<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}
