//! `archive-push` and `archive-get`: the archive_command / restore_command hooks.
