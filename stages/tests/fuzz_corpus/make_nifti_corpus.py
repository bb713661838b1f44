"""Writes the NIfTI seeds of the fuzzing corpus (nifti/) with nibabel: every datatype
path, scaling, qform-only / sform / pixdim-only affines, big-endian and gzip. Run from this
folder with the venv's Python: ~/.cache/meduet/venv/bin/python make_nifti_corpus.py"""
import numpy as np
import nibabel as nib

rng = np.random.default_rng(0)
aff = np.diag([1.5, 1.5, 2.0, 1.0])
aff[:3, 3] = [-10, 5, 3]
nib.save(nib.Nifti1Image(rng.normal(size=(4, 5, 3)).astype(np.float32), aff), "nifti/float32_sform.nii")
img = nib.Nifti1Image((rng.integers(-1000, 1000, size=(3, 4, 4))).astype(np.int16), None)
img.header.set_qform(np.diag([-0.8, 0.8, 1.2, 1.0]), code=1)
img.header.set_sform(None, code=0)
img.header.set_slope_inter(0.5, -1024)
nib.save(img, "nifti/int16_qform_scaled.nii")
nib.save(nib.Nifti1Image(rng.integers(0, 3, size=(4, 4, 4)).astype(np.uint8), aff), "nifti/labels_uint8.nii.gz")
hdr = nib.Nifti1Header(endianness=">")
nib.save(nib.Nifti1Image(rng.normal(size=(3, 3, 3)).astype(">f8"), aff, header=hdr), "nifti/float64_big_endian.nii")
img = nib.Nifti1Image(rng.normal(size=(3, 4, 3)).astype(np.float32), None)
img.header.set_qform(None, code=0)
img.header.set_sform(None, code=0)
img.header.set_zooms((2.0, 1.0, 3.0))
nib.save(img, "nifti/pixdim_only.nii")
th = 0.3
rot = np.array([[np.cos(th), -np.sin(th), 0, 1], [np.sin(th), np.cos(th), 0, 2], [0, 0, 1.5, 3], [0, 0, 0, 1]])
nib.save(nib.Nifti1Image(rng.normal(size=(3, 3, 4)).astype(np.float32), rot), "nifti/rotated_sform.nii.gz")
