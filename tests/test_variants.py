"""The README's ViT variant table matches the analytic and the built parameter counts."""

import os
import re

import jax
from flax import nnx

from mmjax.models.vit import ViT, param_count, variant_config

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _table_rows():
    rows = []
    for line in open(README):
        m = re.match(r"\| (\S+) \| (clip|siglip) \| (\d+) \| (\d+) \| ([\d,]+) \|", line)
        if m:
            rows.append((m[1], m[2], int(m[3]), int(m[4]), int(m[5].replace(",", ""))))
    return rows


def test_readme_variant_table_is_exact():
    rows = _table_rows()
    assert {r[0] for r in rows} >= {"B/16", "L/14", "H/14", "So400m/14", "tiny/4", "tiny/8"}
    for variant, flavour, image, patches, count in rows:
        cfg = variant_config(variant, flavour, image)
        assert (image // cfg.patch_size) ** 2 == patches, variant
        assert param_count(cfg) == count, variant
        model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
        built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert built == count, variant


def test_scanned_and_listed_encoders_agree():
    import jax.numpy as jnp
    import numpy as np

    cfg = variant_config("tiny/8", "clip", 32)
    listed = ViT(cfg, rngs=nnx.Rngs(0))
    scanned = ViT(variant_config("tiny/8", "clip", 32, scan=True, remat="dots"), rngs=nnx.Rngs(0))
    # Copy the listed weights into the scanned stack, then compare outputs.
    lp = nnx.state(listed, nnx.Param).to_pure_dict()
    sp = nnx.state(scanned, nnx.Param)
    layers = [lp["blocks"]["layers"][i] for i in range(cfg.depth)]
    lp["blocks"] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    nnx.replace_by_pure_dict(sp, lp)
    nnx.update(scanned, sp)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    np.testing.assert_allclose(scanned(x), listed(x), atol=1e-5)
    np.testing.assert_allclose(scanned.features(x), listed.features(x), atol=1e-5)
    spec = jax.tree.leaves(nnx.state(scanned.blocks), is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    assert spec.get_metadata()["logical_axes"][0] == "layers"
