"""Device meshes and logical-axis -> mesh-axis partitioning rules."""

from mmjax.parallel.mesh import MESH_AXES, make_mesh, mesh_axes_size, resolve_mesh_shape
from mmjax.parallel.rules import (LAYOUTS, activation_resolver, batch_sharding, get_layout, logical_to_spec,
                                  tree_shardings)

__all__ = ["MESH_AXES", "make_mesh", "mesh_axes_size", "resolve_mesh_shape", "LAYOUTS", "activation_resolver",
           "batch_sharding", "get_layout", "logical_to_spec", "tree_shardings"]
