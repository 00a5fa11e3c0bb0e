"""Device ops, installed as ``npu_dsv3.ops``: each op has a torch_npu path and a portable torch path with identical semantics."""
