//! The `suppressd` binary; everything lives in the library so tests and fuzz targets can reach it.

fn main() -> std::process::ExitCode {
    suppressd::main()
}
