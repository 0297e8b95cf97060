//! `[[policy]]` tables of `config.toml`: scheduled snapshots and their retention
//! (the schedule itself is [`crate::policy`]).

use serde::Deserialize;

use crate::policy::{LabelPattern, Policy, Volumes, parse_duration};

/// `[[policy]]` as written in a file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyTable {
    name: Option<String>,
    volumes: Option<VolumesSpec>,
    every: Option<String>,
    keep: Option<usize>,
    keep_for: Option<String>,
    label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum VolumesSpec {
    One(String),
    List(Vec<String>),
}

impl PolicyTable {
    /// Validates the table. Errors name the key. Volumes need not exist yet: they
    /// may be created later.
    pub(super) fn policy(self) -> Result<Policy, (&'static str, String)> {
        let name = self
            .name
            .ok_or(("name", "is required in [[policy]]".to_string()))?;
        crate::names::VolumeName::parse(&name).map_err(|_| {
            (
                "name",
                format!("`{name}` is not a policy name: use 1-64 of A-Z a-z 0-9 . _ -"),
            )
        })?;
        let volumes = match self.volumes {
            None => return Err(("volumes", "is required: a list of names, or \"*\"".into())),
            Some(VolumesSpec::One(star)) if star == "*" => Volumes::All,
            Some(VolumesSpec::One(one)) => Volumes::Named(vec![one]),
            Some(VolumesSpec::List(list)) if list.is_empty() => {
                return Err(("volumes", "names no volume".into()));
            }
            Some(VolumesSpec::List(list)) => Volumes::Named(list),
        };
        if let Volumes::Named(names) = &volumes
            && let Some(bad) = names
                .iter()
                .find(|n| crate::names::VolumeName::parse(n).is_err())
        {
            return Err(("volumes", format!("`{bad}` is not a volume name")));
        }
        let every = self.every.ok_or((
            "every",
            "is required (a duration such as \"1h\")".to_string(),
        ))?;
        let every_secs = parse_duration(&every).map_err(|e| ("every", e))?;
        let keep_for_secs = self
            .keep_for
            .map(|d| parse_duration(&d))
            .transpose()
            .map_err(|e| ("keep_for", e))?;
        match (self.keep, keep_for_secs) {
            (None, None) => {
                return Err((
                    "keep",
                    "a policy needs keep or keep_for (or both): how many snapshots to keep, or for how long".into(),
                ));
            }
            (Some(0), None) => {
                return Err((
                    "keep",
                    "keep = 0 without keep_for would delete every snapshot the policy takes".into(),
                ));
            }
            _ => {}
        }
        let pattern = self
            .label
            .unwrap_or_else(|| format!("{name}-%Y%m%d-%H%M%S"));
        let label = LabelPattern::parse(&pattern).map_err(|e| ("label", e))?;
        let resolution = label.resolution_secs().unwrap_or(u64::MAX);
        if resolution > every_secs {
            return Err((
                "label",
                format!(
                    "label `{pattern}` tells runs apart only {} apart, but the policy runs every {every}: add finer fields (%H %M %S)",
                    crate::policy::format_duration(resolution)
                ),
            ));
        }
        Ok(Policy {
            name,
            volumes,
            every_secs,
            keep: self.keep,
            keep_for_secs,
            label,
        })
    }
}
