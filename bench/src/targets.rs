//! The targets for eps, checked against a run's results.

use crate::report::{num, Report};

/// One target and what the run says about it.
pub struct Verdict {
    pub name: &'static str,
    /// The numbers compared, in words.
    pub measured: String,
    /// `met`, `**missed**`, or `n/a` when a system it compares with was not run.
    pub verdict: &'static str,
}

/// How a target compares eps's value `e` with another system's `o`: `e OP factor × o`.
enum Rule {
    AtLeast(f64),
    AtMost(f64),
}

/// (name, scenario, other system, rule); `added` rules compare the latency added over direct.
const RELATIVE: [(&str, &str, &str, Rule); 8] = [
    (
        "throughput_1 ≥ 0.8 × direct",
        "throughput_1",
        "direct",
        Rule::AtLeast(0.8),
    ),
    (
        "throughput_1 ≥ rathole",
        "throughput_1",
        "rathole",
        Rule::AtLeast(1.0),
    ),
    (
        "throughput_8 ≥ 0.8 × direct",
        "throughput_8",
        "direct",
        Rule::AtLeast(0.8),
    ),
    (
        "throughput_8 ≥ rathole",
        "throughput_8",
        "rathole",
        Rule::AtLeast(1.0),
    ),
    (
        "connect_p99 ≤ 2 × rathole",
        "connect_p99",
        "rathole",
        Rule::AtMost(2.0),
    ),
    (
        "conn_rate ≥ rathole",
        "conn_rate",
        "rathole",
        Rule::AtLeast(1.0),
    ),
    (
        "idle_rss_per_conn ≤ rathole",
        "idle_rss_per_conn",
        "rathole",
        Rule::AtMost(1.0),
    ),
    (
        "rpc_p50 (two EPS servers) ≤ 3 × direct",
        "rpc_p50",
        "direct",
        Rule::AtMost(3.0),
    ),
];

/// Every target, in the order.
pub fn evaluate(r: &Report) -> Vec<Verdict> {
    let mut out: Vec<Verdict> = RELATIVE[..4].iter().map(|t| relative(r, t)).collect();
    out.push(added_latency(r));
    out.extend(RELATIVE[4..7].iter().map(|t| relative(r, t)));
    out.push(match r.get("idle_rss_per_conn", "eps") {
        Some(e) => Verdict {
            name: "idle_rss_per_conn < 32 KiB",
            measured: format!("eps {} KiB", num(e)),
            verdict: verdict(e < 32.0),
        },
        None => not_run("idle_rss_per_conn < 32 KiB"),
    });
    out.extend(RELATIVE[7..].iter().map(|t| relative(r, t)));
    out
}

fn relative(
    r: &Report,
    (name, scenario, other, rule): &(&'static str, &str, &str, Rule),
) -> Verdict {
    let (Some(e), Some(o)) = (r.get(scenario, "eps"), r.get(scenario, other)) else {
        return not_run(name);
    };
    let (ok, factor) = match *rule {
        Rule::AtLeast(f) => (e >= f * o, f),
        Rule::AtMost(f) => (e <= f * o, f),
    };
    let bound = if factor == 1.0 {
        format!("{other} {}", num(o))
    } else {
        format!("{factor} × {other} {} = {}", num(o), num(factor * o))
    };
    Verdict {
        name,
        measured: format!("eps {} vs {bound}", num(e)),
        verdict: verdict(ok),
    }
}

/// connect_p50 added over direct: eps's must not exceed rathole's.
fn added_latency(r: &Report) -> Verdict {
    const NAME: &str = "connect_p50 added over direct ≤ rathole's";
    let get = |s| r.get("connect_p50", s);
    let (Some(e), Some(o), Some(d)) = (get("eps"), get("rathole"), get("direct")) else {
        return not_run(NAME);
    };
    Verdict {
        name: NAME,
        measured: format!(
            "eps {} ms vs rathole {} ms (direct {} ms)",
            signed(e - d),
            signed(o - d),
            num(d)
        ),
        verdict: verdict(e - d <= o - d),
    }
}

/// A difference with its sign.
fn signed(v: f64) -> String {
    if v < 0.0 {
        format!("−{}", num(-v))
    } else {
        format!("+{}", num(v))
    }
}

fn not_run(name: &'static str) -> Verdict {
    Verdict {
        name,
        measured: "a system it compares was not run".into(),
        verdict: "n/a",
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}
