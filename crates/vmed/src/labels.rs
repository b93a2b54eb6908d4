//! Security labels, the KVM/370 variant: a level from an ordered list (by default
//! `unclassified < confidential < secret < topsecret`) plus a set of categories, written
//! `secret` or `secret:nato,crypto`. Users carry one as their clearance; VMs and images
//! carry one as their classification.
//!
//! One label dominates another when its level is at least as high and its categories
//! include the other's. The rules built on it (Bell–LaPadula):
//! - a user sees and acts on a VM only if the user's clearance dominates the VM's label;
//! - a VM boots an image only if the VM's label dominates the image's (no read up);
//! - information may flow from VM a to VM b only if b's label dominates a's (no write down):
//!   see [`flow_allowed`], for the VM-to-VM channels (networks, vsock relays) to come.

use std::collections::BTreeSet;

/// The levels when the daemon's configuration names none, lowest first.
pub const DEFAULT_LEVELS: &[&str] = &["unclassified", "confidential", "secret", "topsecret"];

/// The ordered list of levels in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Levels(Vec<String>);

impl Default for Levels {
    fn default() -> Self {
        Levels(DEFAULT_LEVELS.iter().map(|s| s.to_string()).collect())
    }
}

impl Levels {
    /// Levels from a list, lowest first: each a name of letters, digits, '-' or '_', none
    /// twice, at least one.
    pub fn new(names: &[String]) -> Result<Levels, String> {
        if names.is_empty() {
            return Err("the list of label levels is empty: name at least one".into());
        }
        for (i, n) in names.iter().enumerate() {
            check_word(n, "label level")?;
            if names[..i].contains(n) {
                return Err(format!("label level {n:?} is listed twice"));
            }
        }
        Ok(Levels(names.to_vec()))
    }

    /// The lowest label: the lowest level, no categories (what an unlabelled object has).
    pub fn lowest(&self) -> Label {
        Label {
            level: 0,
            categories: BTreeSet::new(),
        }
    }

    /// The highest level with no categories (the bootstrap admin's clearance).
    pub fn highest(&self) -> Label {
        Label {
            level: self.0.len() - 1,
            categories: BTreeSet::new(),
        }
    }

    /// Parses `level` or `level:cat1,cat2`.
    pub fn parse(&self, text: &str) -> Result<Label, String> {
        let (level, cats) = text.split_once(':').unwrap_or((text, ""));
        let level = self.0.iter().position(|l| l == level).ok_or_else(|| {
            format!(
                "unknown label level {level:?}: use one of {} (optionally followed by \
                 :CATEGORY,CATEGORY)",
                self.0.join(", ")
            )
        })?;
        let mut categories = BTreeSet::new();
        for c in cats.split(',').filter(|c| !c.is_empty()) {
            check_word(c, "label category")?;
            categories.insert(c.to_string());
        }
        Ok(Label { level, categories })
    }

    /// The label's text, normalised (categories sorted).
    pub fn show(&self, l: &Label) -> String {
        let level = self.0.get(l.level).map(String::as_str).unwrap_or("?");
        if l.categories.is_empty() {
            level.to_string()
        } else {
            let cats: Vec<&str> = l.categories.iter().map(String::as_str).collect();
            format!("{level}:{}", cats.join(","))
        }
    }

    /// A stored label, read leniently: one this configuration cannot parse (its levels
    /// changed) counts as the highest level, so that it is hidden rather than exposed.
    pub fn stored(&self, text: &str) -> Label {
        self.parse(text).unwrap_or_else(|_| Label {
            level: self.0.len() - 1,
            categories: BTreeSet::from(["unreadable-label".to_string()]),
        })
    }
}

fn check_word(w: &str, what: &str) -> Result<(), String> {
    let ok = !w.is_empty()
        && w.len() <= 32
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {w:?} is not valid: use 1 to 32 letters, digits, '-' or '_'"
        ))
    }
}

/// A level (an index into [`Levels`]) and categories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub level: usize,
    pub categories: BTreeSet<String>,
}

impl Label {
    /// Whether `self` dominates `other`: a level at least as high and every category of
    /// `other`.
    pub fn dominates(&self, other: &Label) -> bool {
        self.level >= other.level && self.categories.is_superset(&other.categories)
    }
}

/// Whether information may flow from an object labelled `from` to one labelled `to`:
/// only upward or sideways (the receiver dominates the sender), never down.
pub fn flow_allowed(from: &Label, to: &Label) -> bool {
    to.dominates(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_show_and_dominate() {
        let l = Levels::default();
        let s = l.parse("secret:nato,crypto").unwrap();
        assert_eq!(l.show(&s), "secret:crypto,nato");
        let c = l.parse("confidential").unwrap();
        assert!(s.dominates(&c) && !c.dominates(&s));
        let n = l.parse("secret:nato").unwrap();
        assert!(s.dominates(&n) && !n.dominates(&s));
        let ts = l.parse("topsecret").unwrap();
        assert!(
            !ts.dominates(&n),
            "a higher level without the category does not dominate"
        );
        assert!(
            l.parse("cosmic")
                .unwrap_err()
                .contains("unclassified, confidential")
        );
        assert!(l.parse("secret:a b").is_err());
        assert_eq!(l.show(&l.lowest()), "unclassified");
        assert!(l.stored("bogus").dominates(&l.highest()));
    }

    #[test]
    fn flows_go_only_upward() {
        let l = Levels::default();
        let (c, s) = (l.parse("confidential").unwrap(), l.parse("secret").unwrap());
        assert!(flow_allowed(&c, &s), "up");
        assert!(flow_allowed(&s, &s), "sideways");
        assert!(!flow_allowed(&s, &c), "down is refused");
        let (a, b) = (l.parse("secret:a").unwrap(), l.parse("secret:b").unwrap());
        assert!(
            !flow_allowed(&a, &b) && !flow_allowed(&b, &a),
            "disjoint categories"
        );
    }

    #[test]
    fn custom_levels() {
        let l = Levels::new(&["low".into(), "high".into()]).unwrap();
        assert!(l.parse("high").unwrap().dominates(&l.parse("low").unwrap()));
        assert!(Levels::new(&[]).is_err());
        assert!(Levels::new(&["a".into(), "a".into()]).is_err());
    }
}
