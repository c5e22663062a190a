//! The `suppressd` binary; everything lives in the library so tests and fuzz targets can reach it.

/// sled clones and frees tree nodes on every write; mimalloc makes that markedly cheaper than
/// glibc malloc under concurrent load (see benches/run.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    suppressd::main()
}
