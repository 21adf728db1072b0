//! `/metrics` read with an independent Prometheus text parser (`prometheus-parse`), plus a
//! strict line check of our own (that parser skips lines it does not understand).

use prometheus_parse::{Sample, Value};

pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
    /// Families declared with `# TYPE name kind`.
    pub types: Vec<(String, String)>,
}

/// One histogram series: cumulative buckets (upper bound, count), `_sum` and `_count`.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Scrape {
    /// Parses `text`; panics when a line is neither a comment nor a well-formed sample of a
    /// declared family.
    pub fn parse(text: &str) -> Scrape {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines)
            .unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{text}"));
        let mut types = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut p = rest.split_whitespace();
                let (Some(name), Some(kind), None) = (p.next(), p.next(), p.next()) else {
                    panic!("bad TYPE line {line:?} in:\n{text}");
                };
                types.push((name.to_string(), kind.to_string()));
            }
        }
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let name_end = line
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(line.len());
            let name = &line[..name_end];
            assert!(
                types.iter().any(|(f, _)| name.starts_with(f.as_str())),
                "sample {line:?} belongs to no declared family in:\n{text}"
            );
            let value = line.rsplit(' ').next().unwrap_or("");
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "sample {line:?} has no numeric value"
            );
        }
        Scrape {
            text: text.to_string(),
            samples: parsed.samples,
            types,
        }
    }

    /// The kind declared for family `name` (`counter`, `gauge`, `histogram`, ...).
    pub fn kind(&self, family: &str) -> Option<&str> {
        self.types
            .iter()
            .find(|(f, _)| f == family)
            .map(|(_, k)| k.as_str())
    }

    /// Samples of `metric` whose labels include every pair of `labels`.
    pub fn find(&self, metric: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
            })
            .collect()
    }

    /// The value of the one sample of `metric` whose labels are exactly `labels`.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .find(metric, labels)
            .into_iter()
            .filter(|s| s.labels.len() == labels.len())
            .collect();
        match found.as_slice() {
            [] => None,
            [one] => {
                Some(scalar(&one.value).unwrap_or_else(|| {
                    panic!("{metric}{labels:?} is not a scalar:\n{}", self.text)
                }))
            }
            many => panic!(
                "{} samples of {metric}{labels:?}:\n{}",
                many.len(),
                self.text
            ),
        }
    }

    /// Like [`Scrape::value`], but panics with the whole scrape when the series is missing.
    #[track_caller]
    pub fn must(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(metric, labels)
            .unwrap_or_else(|| panic!("no series {metric}{labels:?} in /metrics:\n{}", self.text))
    }

    /// Sum over every sample of `metric` whose labels include `labels`.
    pub fn sum(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(metric, labels)
            .iter()
            .filter_map(|s| scalar(&s.value))
            .sum()
    }

    /// The histogram `family` with exactly `labels` (besides `le`).
    pub fn histogram(&self, family: &str, labels: &[(&str, &str)]) -> Option<Histogram> {
        let sample = self
            .find(family, labels)
            .into_iter()
            .find(|s| s.labels.len() == labels.len())?;
        let Value::Histogram(buckets) = &sample.value else {
            panic!("{family} is not a histogram:\n{}", self.text);
        };
        let mut buckets: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Histogram {
            buckets,
            sum: self.value(&format!("{family}_sum"), labels)?,
            count: self.value(&format!("{family}_count"), labels)?,
        })
    }
}

pub fn scalar(v: &Value) -> Option<f64> {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => Some(*x),
        _ => None,
    }
}
