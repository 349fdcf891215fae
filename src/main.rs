use bitnest::model::*;
fn main() {
    let src = ModelSource::open(std::path::Path::new(&std::env::args().nth(1).unwrap())).unwrap();
    let t = std::time::Instant::now();
    let m = src.load_f32().unwrap();
    eprintln!("load {:?}", t.elapsed());
    let golden = std::fs::read_to_string("/work/shared/golden/smollm2-135m-instruct.jsonl").unwrap();
    for line in golden.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p: Vec<u32> = v["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let g: Vec<u32> = v["greedy_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let mut s = m.new_session(512, 64);
        let t = std::time::Instant::now();
        let mut logits = m.forward(&mut s, &p, 1).unwrap().to_vec();
        let pf = t.elapsed();
        let mut out = vec![];
        let t = std::time::Instant::now();
        let mut maxerr = 0f32;
        for i in 0..g.len() {
            let am = logits.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0 as u32;
            out.push(am);
            let ids = &v["ref_top5_ids"][i]; let lg = &v["ref_top5_logits"][i];
            for j in 0..5 { let id = ids[j].as_u64().unwrap() as usize; maxerr = maxerr.max((logits[id] - lg[j].as_f64().unwrap() as f32).abs()); }
            logits = m.forward(&mut s, &[g[i]], 1).unwrap().to_vec();
        }
        println!("{} match={} maxerr={maxerr} prefill {:?} decode {:.1} tok/s", v["name"], out == g, pf, g.len() as f64 / t.elapsed().as_secs_f64());
    }
}
