fn main() {
    eprintln!("callgate-bench: not built yet");
}
