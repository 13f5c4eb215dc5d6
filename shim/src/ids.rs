//! Container and sandbox ids as containerd defines them: the shim makes paths of
//! them (`<state_dir>/<sandbox>`, removed whole at teardown) and puts the sandbox's
//! on the guest's kernel command line, so an id that comes from a pod's annotations
//! (`io.kubernetes.cri.sandbox-id`) or anywhere else is checked before any use.

/// containerd's limit (`identifiers.Validate`).
pub const MAX_ID_LEN: usize = 76;

#[derive(Debug, thiserror::Error)]
#[error("{what} {shown}: expected an id as containerd defines it (letters and digits, in runs joined by single '.', '_' or '-', at most {MAX_ID_LEN} characters)")]
pub struct IdError {
    what: String,
    /// The id as the message shows it: quoted, and cut if long.
    shown: String,
}

/// Checks `id` against containerd's id grammar, `[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`,
/// at most [`MAX_ID_LEN`] long. `what` names where it came from, for the error.
pub fn validate(what: &str, id: &str) -> Result<(), IdError> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let separator = |c: char| matches!(c, '.' | '_' | '-');
    let mut previous_was_separator = true; // the first character must be alphanumeric
    let mut well_formed = !id.is_empty() && id.len() <= MAX_ID_LEN;
    for c in id.chars() {
        if !well_formed {
            break;
        }
        if alnum(c) {
            previous_was_separator = false;
        } else if separator(c) && !previous_was_separator {
            previous_was_separator = true;
        } else {
            well_formed = false;
        }
    }
    if well_formed && !previous_was_separator {
        return Ok(());
    }
    let shown = if id.len() > 80 {
        let cut: String = id.chars().take(40).collect();
        format!("{cut:?}... ({} bytes)", id.len())
    } else {
        format!("{id:?}")
    };
    Err(IdError { what: what.to_string(), shown })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_ids_pass() {
        for id in ["pod1", "a", "abc-123_x.y", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", &"a".repeat(76)] {
            validate("sandbox id", id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
        }
    }

    #[test]
    fn paths_spaces_nul_and_huge_ids_are_refused_and_named() {
        let huge = "x".repeat(10 * 1024);
        for id in ["", "/", "..", "../etc", "a/b", ".hidden", "a..b", "a-", "-a", "a b", " a", "a\0b", "a\nb", "é", &"a".repeat(77), &huge]
        {
            let e = validate("annotation io.kubernetes.cri.sandbox-id", id).unwrap_err().to_string();
            assert!(e.starts_with("annotation io.kubernetes.cri.sandbox-id "), "{id:?}: {e}");
            assert!(e.contains("expected an id as containerd defines it"), "{e}");
            assert!(e.len() < 400, "the message stays short even for a {} byte id: {e}", id.len());
        }
        let e = validate("container id", &huge).unwrap_err().to_string();
        assert!(e.contains("(10240 bytes)"), "{e}");
    }
}
