//! Typed access to a request's parameters, which travel as text. Every
//! failure names the parameter, the value and what is accepted.

use std::{collections::HashMap, ops::RangeInclusive, str::FromStr};

use crate::{ParamSpec, TaskError};

/// A request's parameters, checked against its task's [`ParamSpec`]s.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    values: &'a HashMap<String, String>,
    specs: &'static [ParamSpec],
}

impl<'a> Params<'a> {
    /// Checks `values` for unknown and missing keys.
    pub fn new(values: &'a HashMap<String, String>, specs: &'static [ParamSpec]) -> Result<Self, TaskError> {
        if let Some(unknown) = values.keys().find(|k| !specs.iter().any(|s| s.name == k.as_str())) {
            let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
            return Err(TaskError::InvalidParam(if known.is_empty() {
                format!("unknown param {unknown:?}: this task takes no params")
            } else {
                format!("unknown param {unknown:?}; accepted: {}", known.join(", "))
            }));
        }
        if let Some(missing) = specs.iter().find(|s| s.default.is_none() && !values.contains_key(s.name)) {
            return Err(TaskError::InvalidParam(format!(
                "missing required param {:?} ({})",
                missing.name, missing.description
            )));
        }
        Ok(Self { values, specs })
    }

    /// The text value of `name`, or its default.
    pub fn raw(&self, name: &str) -> &'a str {
        match self.values.get(name) {
            Some(v) => v.as_str(),
            None => self
                .specs
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.default)
                .unwrap_or_else(|| panic!("param {name:?} is not declared in the task's spec")),
        }
    }

    /// An integer in `range`.
    pub fn int<T>(&self, name: &str, range: RangeInclusive<T>) -> Result<T, TaskError>
    where
        T: FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let raw = self.raw(name);
        let value: T = raw.trim().parse().map_err(|_| {
            TaskError::InvalidParam(format!(
                "param {name:?}: {raw:?} is not an integer in {}..={}",
                range.start(),
                range.end()
            ))
        })?;
        if !range.contains(&value) {
            return Err(TaskError::InvalidParam(format!(
                "param {name:?}: {value} is out of range {}..={}",
                range.start(),
                range.end()
            )));
        }
        Ok(value)
    }

    /// One of `choices`.
    pub fn choice<'c>(&self, name: &str, choices: &[&'c str]) -> Result<&'c str, TaskError> {
        let raw = self.raw(name);
        choices.iter().find(|c| c.eq_ignore_ascii_case(raw.trim())).copied().ok_or_else(|| {
            TaskError::InvalidParam(format!("param {name:?}: {raw:?} is not one of {}", choices.join("|")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[ParamSpec] = &[ParamSpec::required("n", "a number"), ParamSpec::optional("k", "a kind", "a")];

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn unknown_missing_and_bad_values_are_refused_with_their_name() {
        let m = map(&[("n", "1"), ("zz", "1")]);
        let err = Params::new(&m, SPECS).unwrap_err().to_string();
        assert!(err.contains("\"zz\"") && err.contains("n, k"), "{err}");

        let m = map(&[("k", "b")]);
        let err = Params::new(&m, SPECS).unwrap_err().to_string();
        assert!(err.contains("missing required param \"n\""), "{err}");

        let m = map(&[("n", "x1")]);
        let p = Params::new(&m, SPECS).unwrap();
        assert!(p.int::<u64>("n", 0..=5).unwrap_err().to_string().contains("not an integer"));
        let m = map(&[("n", "9")]);
        let p = Params::new(&m, SPECS).unwrap();
        assert!(p.int::<u64>("n", 0..=5).unwrap_err().to_string().contains("out of range 0..=5"));
    }

    #[test]
    fn defaults_fill_absent_params() {
        let m = map(&[("n", " 4 ")]);
        let p = Params::new(&m, SPECS).unwrap();
        assert_eq!(p.int::<u64>("n", 0..=5).unwrap(), 4);
        assert_eq!(p.choice("k", &["a", "b"]).unwrap(), "a");
    }
}
