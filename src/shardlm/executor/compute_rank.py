"""A compute rank ≥ 1 (a tensor-parallel shard): build this rank's part, then obey the driver.

It blocks on the control broadcast and runs each STEP / SCORE exactly as the driver does
(the model's collectives pair up across ranks); it returns on SHUTDOWN. Any error ends the
process with a non-zero exit code, which the driver reports by the rank's role.
"""

from __future__ import annotations

import torch.distributed as dist

from shardlm.config import ModelConfig
from shardlm.distributed import protocol
from shardlm.distributed.parallel_state import TPContext
from shardlm.engine_config import EngineConfig
from shardlm.executor.launch import device_for_rank
from shardlm.executor.startup import (
    report_compute_stats,
    report_node_stats,
    setup_compute_rank,
)
from shardlm.runtime.runner import ModelRunner
from shardlm.step_inputs import StepInputs


def serve_compute_rank(tp: TPContext, config: EngineConfig) -> None:
    device = device_for_rank(config.model.device)
    runner = ModelRunner(config, ModelConfig.from_pretrained(config.model.model), device, tp)
    setup_compute_rank(tp, runner, config)
    while True:
        command, sizes, payload = protocol.receive(tp)
        if command is protocol.Command.SHUTDOWN:
            break
        if command is protocol.Command.STEP:
            runner.run(StepInputs.decode(sizes, payload))
        elif command is protocol.Command.SCORE:
            if tp.compute_node == 0:  # scoring runs on compute node 0 alone
                runner.score(payload)
        elif command is protocol.Command.RELEASE:
            runner.release(payload.tolist())
        elif command is protocol.Command.NODE_STATS:
            report_node_stats(tp, config, runner.attention.local_nodes())
        elif command is protocol.Command.COMPUTE_STATS:
            report_compute_stats(tp, config, runner)
    dist.destroy_process_group()
