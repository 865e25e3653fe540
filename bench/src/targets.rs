//! The targets for eps, checked against a run's results, for each form of eps run
//! (`eps`, and `eps-embedded` where it has the scenario's row).

use crate::report::{num, Report};

/// One target and what the run says about it.
pub struct Verdict {
    pub name: &'static str,
    /// The form of eps checked: `eps` or `eps-embedded`.
    pub form: &'static str,
    /// The numbers compared, in words.
    pub measured: String,
    /// `met`, `**missed**`, or `n/a` when a system it compares with was not run.
    pub verdict: &'static str,
}

/// How a target compares eps's value `e` with another system's `o`: `e OP factor × o`, or with
/// a fixed bound.
enum Rule {
    AtLeast(f64),
    AtMost(f64),
    Below(f64, &'static str),
}

/// (name, scenario, other system, rule), in the order (issue 15).
const TARGETS: [(&str, &str, &str, Rule); 10] = [
    (
        "connect_cpu_us ≤ rathole",
        "connect_cpu_us",
        "rathole",
        Rule::AtMost(1.0),
    ),
    (
        "conn_rate ≥ rathole",
        "conn_rate",
        "rathole",
        Rule::AtLeast(1.0),
    ),
    (
        "conn_rate ≥ 0.75 × haproxy",
        "conn_rate",
        "haproxy",
        Rule::AtLeast(0.75),
    ),
    (
        "connect1_p50 ≤ 1.25 × haproxy",
        "connect1_p50",
        "haproxy",
        Rule::AtMost(1.25),
    ),
    (
        "rpc_p50 (two EPS servers) ≤ 2 × direct",
        "rpc_p50",
        "direct",
        Rule::AtMost(2.0),
    ),
    (
        "throughput_1 ≥ haproxy",
        "throughput_1",
        "haproxy",
        Rule::AtLeast(1.0),
    ),
    (
        "throughput_8 ≥ haproxy",
        "throughput_8",
        "haproxy",
        Rule::AtLeast(1.0),
    ),
    (
        "connect_p99 ≤ rathole",
        "connect_p99",
        "rathole",
        Rule::AtMost(1.0),
    ),
    (
        "idle_rss_per_conn ≤ rathole",
        "idle_rss_per_conn",
        "rathole",
        Rule::AtMost(1.0),
    ),
    (
        "idle_rss_per_conn < 32 KiB",
        "idle_rss_per_conn",
        "",
        Rule::Below(32.0, "KiB"),
    ),
];

/// The forms of eps a target is checked for. The RPC scenario runs EPS servers on their own,
/// so `rpc_p50` has no `eps-embedded` row, and its target is not listed for that form.
const FORMS: [&str; 2] = ["eps", "eps-embedded"];

/// Every target, in the order, for each form of eps that was run (`eps` as `n/a` when
/// neither was); a form without the target's row (`eps-embedded` and `rpc_p50`) is left out.
pub fn evaluate(r: &Report) -> Vec<Verdict> {
    let ran: Vec<&'static str> = FORMS
        .into_iter()
        .filter(|f| r.systems.iter().any(|s| s == f))
        .collect();
    let mut out = Vec::new();
    for t in &TARGETS {
        if ran.is_empty() {
            out.push(not_run(t.0, "eps"));
        }
        for &form in &ran {
            if form == "eps" || r.get(t.1, form).is_some() {
                out.push(check(r, form, t));
            }
        }
    }
    out
}

fn check(
    r: &Report,
    form: &'static str,
    (name, scenario, other, rule): &(&'static str, &str, &str, Rule),
) -> Verdict {
    let Some(e) = r.get(scenario, form) else {
        return not_run(name, form);
    };
    let (factor, ok) = match *rule {
        Rule::Below(bound, unit) => {
            return Verdict {
                name,
                form,
                measured: format!("{form} {} {unit}", num(e)),
                verdict: verdict(e < bound),
            }
        }
        Rule::AtLeast(f) => (f, f64::ge as fn(&f64, &f64) -> bool),
        Rule::AtMost(f) => (f, f64::le as fn(&f64, &f64) -> bool),
    };
    let Some(o) = r.get(scenario, other) else {
        return not_run(name, form);
    };
    let bound = if factor == 1.0 {
        format!("{other} {}", num(o))
    } else {
        format!("{factor} × {other} {} = {}", num(o), num(factor * o))
    };
    Verdict {
        name,
        form,
        measured: format!("{form} {} vs {bound}", num(e)),
        verdict: verdict(ok(&e, &(factor * o))),
    }
}

fn not_run(name: &'static str, form: &'static str) -> Verdict {
    Verdict {
        name,
        form,
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
