//! Results of the bench (one value per measurement), medians over rounds, and BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The modes measured side by side, each in its own network namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    NoProxy,
    SockLb,
    Tc,
    IptNft,
    IptLegacy,
    Nft,
    /// Not a bed of its own: the socket-LB bed's agent, whose XDP program forwards NodePort
    /// traffic arriving on the node's LAN interface (the NodePort results of that bed).
    Xdp,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::NoProxy,
        Mode::SockLb,
        Mode::Tc,
        Mode::IptNft,
        Mode::IptLegacy,
        Mode::Nft,
    ];
    pub const ANCHORS: [Mode; 3] = [Mode::IptNft, Mode::IptLegacy, Mode::Nft];

    pub fn label(self) -> &'static str {
        match self {
            Mode::NoProxy => "no proxy",
            Mode::SockLb => "ours: socket LB",
            Mode::Tc => "ours: tc",
            Mode::IptNft => "iptables (nft)",
            Mode::IptLegacy => "iptables-legacy",
            Mode::Nft => "nftables mode",
            Mode::Xdp => "ours: XDP",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Mode::NoProxy => "noproxy",
            Mode::SockLb => "socklb",
            Mode::Tc => "tc",
            Mode::IptNft => "ipt-nft",
            Mode::IptLegacy => "ipt-legacy",
            Mode::Nft => "nft",
            Mode::Xdp => "xdp",
        }
    }

    pub fn is_agent(self) -> bool {
        matches!(self, Mode::SockLb | Mode::Tc)
    }
}

/// One measured value.
#[derive(Clone, Debug)]
pub enum V {
    Num(f64),
    /// Stopped at its time limit (seconds).
    Over(f64),
    /// Not measured, and why.
    Skip(String),
    /// The measurement failed.
    Fail(String),
}

/// Every value by (N, mode, metric), in the order measured.
#[derive(Default)]
pub struct Results {
    pub values: BTreeMap<(usize, Mode, &'static str), Vec<V>>,
    pub notes: Vec<String>,
}

impl Results {
    pub fn add(&mut self, n: usize, mode: Mode, metric: &'static str, v: V) {
        self.values.entry((n, mode, metric)).or_default().push(v);
    }

    pub fn get(&self, n: usize, mode: Mode, metric: &str) -> Option<&[V]> {
        self.values
            .iter()
            .find(|((a, b, c), _)| *a == n && *b == mode && *c == metric)
            .map(|(_, v)| v.as_slice())
    }

    /// The summary of one cell.
    pub fn cell(&self, n: usize, mode: Mode, metric: &str) -> Cell {
        Cell::of(self.get(n, mode, metric).unwrap_or(&[]))
    }
}

/// Median over rounds, with what else happened.
#[derive(Clone, Debug)]
pub enum Cell {
    Empty,
    Value {
        median: f64,
        /// (max - min) / median over the rounds with a number.
        spread: f64,
        count: usize,
    },
    Over(f64),
    Skip(String),
    Fail(String),
}

impl Cell {
    fn of(vals: &[V]) -> Cell {
        let mut nums: Vec<f64> = vals
            .iter()
            .filter_map(|v| match v {
                V::Num(x) if x.is_finite() => Some(*x),
                _ => None,
            })
            .collect();
        let over = vals.iter().find_map(|v| match v {
            V::Over(s) => Some(*s),
            _ => None,
        });
        // A time limit reached in any round makes the cell "over": medians would hide it.
        if let Some(s) = over {
            return Cell::Over(s);
        }
        if nums.is_empty() {
            return match vals.first() {
                Some(V::Skip(s)) => Cell::Skip(s.clone()),
                Some(V::Fail(s)) => Cell::Fail(s.clone()),
                _ => Cell::Empty,
            };
        }
        nums.sort_by(f64::total_cmp);
        let m = nums.len();
        let median = if m % 2 == 1 {
            nums[m / 2]
        } else {
            (nums[m / 2 - 1] + nums[m / 2]) / 2.0
        };
        let spread = if median != 0.0 {
            (nums[m - 1] - nums[0]) / median.abs()
        } else {
            0.0
        };
        Cell::Value {
            median,
            spread,
            count: m,
        }
    }

    pub fn num(&self) -> Option<f64> {
        match self {
            Cell::Value { median, .. } => Some(*median),
            _ => None,
        }
    }
}

/// How a metric is shown.
#[derive(Clone, Copy)]
pub enum Unit {
    /// Seconds, shown as ms or s.
    Secs,
    /// Per second.
    Rate,
    /// Microseconds.
    Micros,
    /// Nanoseconds.
    Nanos,
    Gbps,
    MiB,
    Percent,
}

pub fn fmt_num(x: f64, unit: Unit) -> String {
    match unit {
        Unit::Secs => {
            if x < 0.001 {
                format!("{:.2} ms", x * 1e3)
            } else if x < 1.0 {
                format!("{:.0} ms", x * 1e3)
            } else if x < 10.0 {
                format!("{x:.2} s")
            } else {
                format!("{x:.1} s")
            }
        }
        Unit::Rate => {
            if x >= 1000.0 {
                format!("{:.1}k/s", x / 1000.0)
            } else {
                format!("{x:.0}/s")
            }
        }
        Unit::Micros => {
            if x >= 10_000.0 {
                format!("{:.1} ms", x / 1000.0)
            } else {
                format!("{x:.0} µs")
            }
        }
        Unit::Nanos => format!("{x:.0} ns"),
        Unit::Gbps => format!("{x:.1} Gbit/s"),
        Unit::MiB => format!("{x:.1} MiB"),
        Unit::Percent => format!("{x:.1} %"),
    }
}

/// Spread above which a cell is marked noisy.
pub const NOISY: f64 = 0.25;

pub fn fmt_cell(c: &Cell, unit: Unit) -> String {
    match c {
        Cell::Empty => "-".into(),
        Cell::Value {
            median,
            spread,
            count,
        } => {
            let mut s = fmt_num(*median, unit);
            if *count > 1 && *spread > NOISY {
                s.push_str(" †");
            }
            if *count == 1 {
                s.push_str(" ¹");
            }
            s
        }
        Cell::Over(t) => format!("over {t:.0} s"),
        Cell::Skip(why) => format!("skipped: {why}"),
        Cell::Fail(e) => format!("failed: {}", short(e)),
    }
}

fn short(e: &str) -> String {
    let e = e.replace('|', "/").replace('\n', " ");
    if e.len() > 80 {
        format!("{}…", &e[..e.floor_char_boundary(80)])
    } else {
        e
    }
}

/// ours / anchor. Over-limit anchors give an upper bound for times ("< x") and nothing for
/// rates.
pub fn fmt_ratio(ours: &Cell, anchor: &Cell) -> String {
    match (ours.num(), anchor) {
        (Some(o), Cell::Value { median, .. }) if *median != 0.0 => fmt_factor(o / median),
        (Some(o), Cell::Over(t)) => format!("< {}", fmt_factor(o / t)),
        _ => "-".into(),
    }
}

fn fmt_factor(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}×")
    } else if r >= 10.0 {
        format!("{r:.1}×")
    } else if r >= 0.01 {
        format!("{r:.2}×")
    } else {
        format!("{r:.4}×")
    }
}

/// A Markdown table.
pub fn table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}|",
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn medians_and_marks() {
        let c = Cell::of(&[V::Num(3.0), V::Num(1.0), V::Num(2.0)]);
        assert_eq!(c.num(), Some(2.0));
        assert_eq!(fmt_cell(&c, Unit::Secs), "2.00 s †");
        let c = Cell::of(&[V::Num(1.0), V::Over(60.0)]);
        assert_eq!(fmt_cell(&c, Unit::Secs), "over 60 s");
        assert_eq!(
            fmt_cell(&Cell::of(&[V::Num(0.0123)]), Unit::Secs),
            "12 ms ¹"
        );
        assert_eq!(fmt_num(13_200.0, Unit::Rate), "13.2k/s");
        let ours = Cell::of(&[V::Num(0.5)]);
        assert_eq!(fmt_ratio(&ours, &Cell::Over(50.0)), "< 0.01×");
        assert_eq!(fmt_ratio(&ours, &Cell::of(&[V::Num(2.0)])), "0.25×");
    }
}
