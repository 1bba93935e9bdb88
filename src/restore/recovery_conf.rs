//! The recovery settings PostgreSQL reads: `recovery.signal` / `standby.signal` and lines
//! appended to `postgresql.auto.conf` (PostgreSQL 12+).

use crate::recovery::{format_pg_time, RestorePlan, Target};

/// Quotes a value for postgresql.conf: single quotes, with embedded quotes doubled.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes one word for the shell that runs restore_command.
pub fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=,+@%".contains(&b))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The postgresql.auto.conf block for `plan`, with `restore_command` given ready-made.
pub fn settings_block(plan: &RestorePlan, restore_command: &str) -> String {
    let mut s = String::from(
        "\n# Added by pitr restore: remove after recovery if you no longer need it.\n",
    );
    s.push_str(&format!("restore_command = {}\n", quote(restore_command)));
    let target_line = match &plan.target {
        Target::Latest => None,
        Target::Immediate => Some("recovery_target = 'immediate'".to_string()),
        Target::Time(t) => Some(format!(
            "recovery_target_time = {}",
            quote(&format_pg_time(t))
        )),
        Target::Lsn(l) => Some(format!("recovery_target_lsn = {}", quote(&l.to_string()))),
        Target::Xid(x) => Some(format!("recovery_target_xid = {}", quote(&x.to_string()))),
        Target::Name(n) => Some(format!("recovery_target_name = {}", quote(n))),
    };
    if let Some(line) = target_line {
        s.push_str(&line);
        s.push('\n');
        if !matches!(plan.target, Target::Immediate) {
            s.push_str(&format!(
                "recovery_target_inclusive = {}\n",
                if plan.inclusive { "on" } else { "off" }
            ));
        }
        s.push_str(&format!(
            "recovery_target_action = {}\n",
            quote(&plan.action.to_string())
        ));
    }
    s.push_str(&format!(
        "recovery_target_timeline = {}\n",
        quote(&plan.timeline.to_string())
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(shell_word("/usr/bin/pitr"), "/usr/bin/pitr");
        assert_eq!(shell_word("s3://b/p"), "s3://b/p");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("x'y"), r"'x'\''y'");
    }
}
