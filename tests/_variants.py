"""A variant for a device type the test cluster adds on purpose (B200), shared by tests."""

B200 = "tiny-sd-b200"
B200_VARIANT = f"""
[[variant]]
name = "{B200}"
source = "builtin:{B200}"
steps = 2
guidance_scale = 1.0
max_size_px = 128
quality_score = 0.3
quality_provenance = "declared: test variant"
power_w = 300.0
resources = {{ num_cpus = 0.5, accelerator_types = ["B200"] }}
builtin = {{ unet_block_out_channels = [32, 64], unet_layers_per_block = 1, init_seed = 7 }}

[variant.energy_prior]
joules_per_image = {{ 1 = 10.0 }}
provenance = "declared for a test"
"""
