fn main() {
    let f = bitnest::format::gguf::GgufFile::open(std::path::Path::new(&std::env::args().nth(1).unwrap())).unwrap();
    for (k, v) in &f.metadata { println!("{k} = {}", bitnest::format::gguf::GgufFile::describe_value(v)); }
    for t in f.tensors.iter().take(15) { println!("{} {:?} {:?}", t.name, t.shape, t.dtype); }
    println!("{} tensors", f.tensors.len());
}
