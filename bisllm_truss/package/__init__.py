"""`bisllm package`: render a validated config into a truss dir, a Docker context and manifests."""

from bisllm_truss.package.outdir import OutputDirError, write_tree
from bisllm_truss.package.render import PackageOptions, render_package

__all__ = ["OutputDirError", "PackageOptions", "render_package", "write_tree"]
