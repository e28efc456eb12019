//! `echo-bench spread`: how a load balancer spreads connections over replicas.
//!
//! Opens `--connections` connections one after another (at most `--concurrency` at a time)
//! through the balancer, reads the identity line each replica sends (echo-service's
//! `--identity-listen` port, or with `--greeting` its echo port, where the echo is then
//! verified on the same connection), and reports the count and share per replica and a
//! chi-square test of "the spread is even". A replica is named by its `pod_name`, else by
//! `hostname` plus `listener_address` (several replicas on one host).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::SpreadArgs;
use crate::connect::Connector;

/// Longest identity line accepted.
const MAX_LINE: usize = 64 * 1024;
/// Bytes echoed per connection in `--greeting` mode.
const ECHO_PROBE: &[u8] = b"echo-bench spread probe: 0123456789abcdefghijklmnopqrstuvwxyz\n";
/// p-value below which the spread is reported as uneven.
pub const SIGNIFICANCE: f64 = 0.01;

/// What one connection found.
enum Outcome {
    Replica(String),
    Error(String),
}

pub async fn run(args: &SpreadArgs, connector: Arc<Connector>) -> Result<Value, String> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        // One connection at a time per permit, opened in order, so a round-robin balancer
        // sees them in sequence.
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let connector = connector.clone();
        let greeting = args.greeting;
        tasks.push(tokio::spawn(async move {
            let outcome = probe(&connector, greeting).await;
            drop(permit);
            outcome
        }));
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0u64;
    let mut first_error = None;
    for task in tasks {
        match task.await.map_err(|e| e.to_string())? {
            Outcome::Replica(name) => *counts.entry(name).or_default() += 1,
            Outcome::Error(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    Ok(report(&counts, args.expected_replicas, errors, first_error))
}

async fn probe(connector: &Connector, greeting: bool) -> Outcome {
    let timeout = connector.io_timeout();
    let work = async {
        let mut stream = connector
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let newline = loop {
            if let Some(at) = buf.iter().position(|b| *b == b'\n') {
                break at;
            }
            if buf.len() > MAX_LINE {
                return Err("identity line longer than 64 KiB".to_string());
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before a full identity line".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let identity: Value = serde_json::from_slice(&buf[..newline])
            .map_err(|e| format!("identity line is not JSON: {e}"))?;
        let name = replica_name(&identity);
        if greeting {
            // The echo must follow the greeting on the same connection, byte-exact.
            stream
                .write_all(ECHO_PROBE)
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut back = buf[newline + 1..].to_vec();
            while back.len() < ECHO_PROBE.len() {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&chunk[..n]);
            }
            if back != ECHO_PROBE {
                return Err(format!(
                    "echo after the greeting differs ({} bytes back)",
                    back.len()
                ));
            }
        }
        Ok(name)
    };
    match tokio::time::timeout(timeout * 2, work).await {
        Ok(Ok(name)) => Outcome::Replica(name),
        Ok(Err(e)) => Outcome::Error(e),
        Err(_) => Outcome::Error(format!("no identity within {timeout:?}")),
    }
}

/// `pod_name`, else `hostname listener_address`.
fn replica_name(identity: &Value) -> String {
    match identity["pod_name"].as_str() {
        Some(pod) => pod.to_string(),
        None => format!(
            "{} {}",
            identity["hostname"].as_str().unwrap_or("?"),
            identity["listener_address"].as_str().unwrap_or("?")
        ),
    }
}

fn report(
    counts: &BTreeMap<String, u64>,
    expected_replicas: Option<usize>,
    errors: u64,
    first_error: Option<String>,
) -> Value {
    let total: u64 = counts.values().sum();
    let replicas = expected_replicas.unwrap_or(counts.len()).max(counts.len());
    let replicas_list: Vec<Value> = counts
        .iter()
        .map(|(name, n)| {
            json!({
                "replica": name,
                "connections": n,
                "share": if total > 0 { *n as f64 / total as f64 } else { 0.0 },
            })
        })
        .collect();
    let (statistic, dof, p) = chi_square_even(counts.values().copied(), replicas, total);
    json!({
        "connections": total + errors,
        "identified": total,
        "errors": errors,
        "first_error": first_error,
        "replicas_seen": counts.len(),
        "replicas_expected": replicas,
        "replicas": replicas_list,
        "chi_square": {
            "statistic": statistic,
            "degrees_of_freedom": dof,
            "p_value": p,
            "even": p >= SIGNIFICANCE,
        },
    })
}

/// Pearson's chi-square of `counts` (plus zeros for replicas that got nothing, up to
/// `replicas`) against an even spread of `total`: (statistic, degrees of freedom, p-value).
pub fn chi_square_even(
    counts: impl Iterator<Item = u64>,
    replicas: usize,
    total: u64,
) -> (f64, usize, f64) {
    if replicas < 2 || total == 0 {
        return (0.0, 0, 1.0);
    }
    let expected = total as f64 / replicas as f64;
    let seen: Vec<u64> = counts.collect();
    let missing = replicas.saturating_sub(seen.len());
    let statistic = seen
        .iter()
        .map(|&n| (n as f64 - expected).powi(2) / expected)
        .sum::<f64>()
        + missing as f64 * expected;
    let dof = replicas - 1;
    (statistic, dof, gamma_q(dof as f64 / 2.0, statistic / 2.0))
}

/// The regularized upper incomplete gamma function Q(a, x) = P(chi2_{2a} > 2x): a series
/// below a + 1, a continued fraction above (Numerical Recipes, `gammq`).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let ln_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let mut sum = 1.0 / a;
        let mut term = sum;
        let mut ap = a;
        for _ in 0..500 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * ln_prefix.exp()).clamp(0.0, 1.0)
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..500 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (ln_prefix.exp() * h).clamp(0.0, 1.0)
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The report as a table: one row per replica, then the test.
pub fn print_table(report: &Value) {
    println!("{:<48} {:>12} {:>8}", "replica", "connections", "share");
    for r in report["replicas"].as_array().into_iter().flatten() {
        println!(
            "{:<48} {:>12} {:>7.1}%",
            r["replica"].as_str().unwrap_or("?"),
            r["connections"].as_u64().unwrap_or(0),
            r["share"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    let chi = &report["chi_square"];
    println!(
        "\n{} connections, {} identified, {} errors; {} replica(s) seen of {} expected",
        report["connections"],
        report["identified"],
        report["errors"],
        report["replicas_seen"],
        report["replicas_expected"]
    );
    println!(
        "chi-square vs even spread: {:.3} with {} degree(s) of freedom, p = {:.4} ({})",
        chi["statistic"].as_f64().unwrap_or(0.0),
        chi["degrees_of_freedom"],
        chi["p_value"].as_f64().unwrap_or(0.0),
        if chi["even"].as_bool().unwrap_or(false) {
            "consistent with even"
        } else {
            "UNEVEN at p < 0.01"
        }
    );
    if let Some(e) = report["first_error"].as_str() {
        println!("first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_values_match_tables() {
        // Critical values at p = 0.05 (dof 1, 2, 5) and p = 0.01 (dof 2).
        for (x, dof, p) in [
            (3.841, 1, 0.05),
            (5.991, 2, 0.05),
            (11.070, 5, 0.05),
            (9.210, 2, 0.01),
        ] {
            let q = gamma_q(dof as f64 / 2.0, x / 2.0);
            assert!((q - p).abs() < 1e-3, "dof {dof} x {x}: {q} != {p}");
        }
        assert_eq!(chi_square_even([100, 100, 100].into_iter(), 3, 300).0, 0.0);
        let (s, dof, p) = chi_square_even([300].into_iter(), 3, 300);
        assert_eq!((s, dof), (600.0, 2));
        assert!(p < 1e-100);
    }
}
