//! Command-line parsing and output. Calls the library; holds no logic.
