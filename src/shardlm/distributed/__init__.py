"""The torch.distributed primitives: who this process is (TPContext) and the driver → worker
command broadcast."""
