fn main() {
    println!("torch threads {}", tch::get_num_threads());
    println!("cuda {}", tch::Cuda::is_available());
    println!("kinds {:?}", meduet_stages::registry().names());
}
