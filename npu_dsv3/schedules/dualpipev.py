"""DualPipeV as a megatron-core forward-backward function, registered as megatron's schedule.

Rank r of P pipeline ranks holds two model chunks: chunk 0 is stage r and chunk 1
is stage 2P-1-r. A micro-batch goes down the ranks through chunk 0 (rank r sends
its output to rank r+1), turns round on rank P-1 (whose chunk 0 output is its own
chunk 1 input) and comes back up through chunk 1 (rank r sends to rank r-1); chunk 1
of rank 0 computes the loss. Gradients travel the reverse way.

Each rank runs its operations in ``plan("dualpipev", P, M)`` order. ``B`` operations
(the zero-bubble ones) compute input gradients only: layers that support the split
(megatron's linears, the grouped experts) queue their weight-gradient GEMMs, which
the matching ``W`` operation runs later (``npu_dsv3.ops.weight_grad``). An
``FB`` pair runs its forward and then its backward, one after the other, or with
``--moe-fb-overlap`` both at once on two threads, so that one's communication (the MoE
all-to-alls) runs while the other computes (``npu_dsv3.schedules.fb_overlap``). Forwards
and backwards are megatron's own ``forward_step`` and ``backward_step``, so the loss
is divided by the number of micro-batches and the MoE aux-loss and MTP-loss scales
are set exactly as in megatron's schedules; at the end megatron's
``finalize_model_grads_func`` reduces the gradients. ``_DualPipeV`` is one run on one rank:
its state on ``self`` and one method per operation kind.

``npu_dsv3.features.dualpipev`` patches megatron's ``get_forward_backward_func`` with
``dispatching``: the function it returns runs this schedule for a model whose config says
``schedules_method == "dualpipev"`` and megatron's otherwise.
"""

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.schedules import backward_step, deallocate_output_tensor, forward_step
from megatron.core.utils import get_model_config, get_model_type, unwrap_model

from npu_dsv3.ops import weight_grad
from npu_dsv3.schedules import fb_overlap
from npu_dsv3.schedules.plan import Op, plan

Work = Tuple[int, int]
"""(micro-batch, chunk)."""


def rank_ops(pp: int, num_microbatches: int, forward_only: bool = False) -> List[List[Op]]:
    """Every rank's operations, in order: the DualPipeV plan, or its forwards alone (every
    dependency of a forward is a forward, so they keep a valid order)."""
    ranks = plan("dualpipev", pp, num_microbatches).ranks
    if forward_only:
        return [[Op("F", m, c) for op in ops for m, c in op.forwards()] for ops in ranks]
    return [list(ops) for ops in ranks]


def _steps(op: Op) -> List[Tuple[str, Work]]:
    """An op as the forward and backward steps it runs, forward first."""
    return [("F", w) for w in op.forwards()] + [("B", w) for w in op.backwards()]


def _destination(pp: int, rank: int, step: str, chunk: int) -> Optional[int]:
    """The pipeline rank a step's result goes to; None when it stays on this rank or has none.

    Forwards of chunk 0 and backwards of chunk 1 go down (to rank + 1), the others up.
    """
    down = (step == "F") == (chunk == 0)
    peer = rank + 1 if down else rank - 1
    return peer if 0 <= peer < pp else None


class _Mailbox:
    """Receives from one neighbour in the order that neighbour sends.

    Both ranks derive the neighbour's send order from the same plan, so the receives
    are posted in the order the messages leave, which matches them on any backend
    (point-to-point messages between two ranks are delivered in order).
    """

    def __init__(self, expected: List[Tuple[str, Work]], peer: int, group, shape, dtype):
        self.expected, self.peer, self.group, self.shape, self.dtype = expected, peer, group, shape, dtype
        self.posted: Dict[Tuple[str, Work], Tuple[object, torch.Tensor]] = {}

    def take(self, step: str, work: Work) -> torch.Tensor:
        # Post the receives of every earlier message first: they were sent before this one.
        while (step, work) not in self.posted:
            key = self.expected.pop(0)
            buffer = torch.empty(self.shape, dtype=self.dtype, device=torch.cuda.current_device())
            self.posted[key] = (dist.irecv(buffer, src=self.peer, group=self.group), buffer)
        handle, buffer = self.posted.pop((step, work))
        handle.wait()
        return buffer


def _mailbox(ops_of_peer: List[Op], pp: int, peer_rank: int, my_rank: int, group, shape, dtype) -> _Mailbox:
    expected = [(step, work) for op in ops_of_peer for step, work in _steps(op)
                if _destination(pp, peer_rank, step, work[1]) == my_rank]
    peer = dist.get_process_group_ranks(group)[peer_rank]
    return _Mailbox(expected, peer, group, shape, dtype)


class _DualPipeV:
    """One run of the schedule on this rank: the state its steps share, and one method per step kind.

    Steps hand tensors on through dicts keyed by (micro-batch, chunk): a forward leaves its input
    and output to its backward, a ``B`` step its weight-gradient closures to its ``W`` step, and on
    the turning rank (P-1) the two chunks hand over locally what other ranks send to a neighbour.
    """

    def __init__(self, forward_step_func, data_iterator, model, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, forward_only: bool):
        assert len(model) == 2, "dualpipev runs two model chunks per pipeline rank"
        self.config = get_model_config(model[0])
        if self.config.variable_seq_lengths:
            raise ValueError("dualpipev sends fixed-shape activations; variable sequence lengths are not supported")
        self.forward_step_func, self.data_iterator, self.model = forward_step_func, data_iterator, model
        self.model_type = get_model_type(model[0])
        self.num_microbatches, self.forward_only = num_microbatches, forward_only
        self.overlap = getattr(self.config, "moe_fb_overlap", False) and not forward_only
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.rank = parallel_state.get_pipeline_model_parallel_rank()
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.cp = parallel_state.get_context_parallel_world_size()
        every_rank = rank_ops(self.pp, num_microbatches, forward_only)
        self.ops = every_rank[self.rank]
        self.mailboxes = self._mailboxes(every_rank, seq_length, micro_batch_size)

        self.inputs: Dict[Work, Optional[torch.Tensor]] = {}
        self.outputs: Dict[Work, torch.Tensor] = {}
        # Handed over locally on the turning rank: chunk 0's outputs, chunk 1's input gradients.
        self.turn_outputs: Dict[int, torch.Tensor] = {}
        self.output_grads: Dict[Work, torch.Tensor] = {}
        self.deferred: Dict[Work, list] = {}
        # Sends in flight with their tensors, which must live until the send completes.
        self.activation_sends: Dict[Work, Tuple[object, torch.Tensor]] = {}
        self.gradient_sends: List[Tuple[object, torch.Tensor]] = []
        self.losses: list = []
        self.total_tokens = torch.zeros([], dtype=torch.int)

    def _mailboxes(self, every_rank: List[List[Op]], seq_length: int, micro_batch_size: int) -> Dict[int, _Mailbox]:
        """One per neighbour, for what it sends here: activations of ``[s, b, h]``, s split by context
        parallelism and (with sequence parallelism) by tensor parallelism."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        seq = seq_length // self.cp // (tp if self.config.sequence_parallel else 1)
        shape, dtype = (seq, micro_batch_size, self.config.hidden_size), self.config.pipeline_dtype
        return {peer: _mailbox(every_rank[peer], self.pp, peer, self.rank, self.group, shape, dtype)
                for peer in (self.rank - 1, self.rank + 1) if 0 <= peer < self.pp}

    def run(self, executed: Optional[List[Op]]) -> list:
        """This rank's operations in plan order, then the gradient reduction; returns the losses."""
        with self._no_sync():
            for op in self.ops:
                self._run_op(op)
                if executed is not None:
                    executed.append(op)
        for handle, _ in [*self.activation_sends.values(), *self.gradient_sends]:
            handle.wait()
        if not self.forward_only:
            self._finish_gradients()
        return self.losses

    def _run_op(self, op: Op) -> None:
        if op.kind == "F":
            self._forward(op.microbatch, op.chunk)
        elif op.kind == "W":
            self._weight(op.microbatch, op.chunk)
        elif op.kind == "FB":
            (self._overlapped_pair if self.overlap else self._pair)(op.forwards()[0], op.backwards()[0])
        else:  # "B" leaves its weight gradients to a later "W"; "BW" computes them at once
            self._backward(op.microbatch, op.chunk, defer_weights=op.kind == "B")

    # The step kinds.

    def _forward(self, m: int, chunk: int) -> None:
        input_tensor = self._forward_input(m, chunk)
        self._forward_output(m, chunk, input_tensor, self._forward_compute(m, chunk, input_tensor))

    def _backward(self, m: int, chunk: int, defer_weights: bool) -> None:
        inputs = self._backward_inputs(m, chunk)
        self._backward_output(m, chunk, self._backward_compute(m, chunk, *inputs, defer_weights=defer_weights))

    def _weight(self, m: int, chunk: int) -> None:
        weight_grad.run(self.deferred.pop((m, chunk)))

    def _pair(self, forward: Work, backward: Work) -> None:
        self._forward(*forward)
        self._backward(*backward, defer_weights=False)

    def _overlapped_pair(self, forward: Work, backward: Work) -> None:
        """The pair as two concurrent lanes; receives before and sends after, on this thread,
        in the order the sequential pair uses (so the neighbours' mailboxes need no change)."""
        input_tensor, backward_inputs = self._forward_input(*forward), self._backward_inputs(*backward)
        results = {}
        fb_overlap.run_pair(
            lambda: results.__setitem__("F", self._forward_compute(*forward, input_tensor)),
            lambda: results.__setitem__("B", self._backward_compute(*backward, *backward_inputs, defer_weights=False)))
        self._forward_output(*forward, input_tensor, results["F"])
        self._backward_output(*backward, results["B"])

    # A forward: its input, its computation, where its output goes.

    def _forward_input(self, m: int, chunk: int) -> Optional[torch.Tensor]:
        if chunk == 0:
            input_tensor = None if self.rank == 0 else self.mailboxes[self.rank - 1].take("F", (m, 0))
        elif self.rank == self.pp - 1:
            # The turn: chunk 0's output enters chunk 1 as a leaf whose gradient chunk 0's backward needs.
            input_tensor = self.turn_outputs.pop(m).detach()
        else:
            input_tensor = self.mailboxes[self.rank + 1].take("F", (m, 1))
        if input_tensor is not None:
            input_tensor.requires_grad_(not self.forward_only)
        return input_tensor

    def _forward_compute(self, m: int, chunk: int, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """megatron's ``forward_step``; on the loss chunk (chunk 1 of rank 0) it appends the loss
        function's outputs to ``self.losses``."""
        output, tokens = forward_step(
            self.forward_step_func, self.data_iterator[chunk], self.model[chunk], self.num_microbatches, input_tensor,
            self.losses, self.config, cp_group_size=self.cp, is_first_microbatch=m == 0, current_microbatch=m,
            vp_stage=chunk, is_last_stage=self.rank == 0 and chunk == 1)
        self.total_tokens = self.total_tokens + tokens
        return output

    def _forward_output(self, m: int, chunk: int, input_tensor: Optional[torch.Tensor], output: torch.Tensor) -> None:
        if _destination(self.pp, self.rank, "F", chunk) is not None:
            self._send("F", (m, chunk), output)
        elif chunk == 0:
            self.turn_outputs[m] = output
        if not self.forward_only:
            self.inputs[(m, chunk)], self.outputs[(m, chunk)] = input_tensor, output

    # A backward: its inputs, its computation, where its input gradient goes.

    def _backward_inputs(self, m: int, chunk: int):
        """(input, output, output gradient) of a backward; the output gradient is None for the loss."""
        work = (m, chunk)
        if self.rank == 0 and chunk == 1:
            output_grad = None
        elif chunk == 0 and self.rank == self.pp - 1:
            output_grad = self.output_grads.pop(work)
        else:
            peer = self.rank - 1 if chunk == 1 else self.rank + 1
            output_grad = self.mailboxes[peer].take("B", work)
        output = self.outputs.pop(work)
        if work in self.activation_sends:
            # The peer received this activation before it could send its gradient back.
            self.activation_sends.pop(work)[0].wait()
        if output_grad is not None:  # megatron's pseudo-free of every output but the loss
            deallocate_output_tensor(output, self.config.deallocate_pipeline_outputs)
        return self.inputs.pop(work), output, output_grad

    def _backward_compute(self, m: int, chunk: int, input_tensor, output, output_grad, defer_weights: bool):
        """megatron's ``backward_step``; with ``defer_weights`` (a ``B`` step) the weight-gradient
        GEMMs are kept for the ``W`` step of the same (micro-batch, chunk)."""
        if not defer_weights:
            return backward_step(input_tensor, output, output_grad, self.model_type, self.config)
        with weight_grad.deferring() as closures:
            input_grad = backward_step(input_tensor, output, output_grad, self.model_type, self.config)
        self.deferred[(m, chunk)] = closures
        return input_grad

    def _backward_output(self, m: int, chunk: int, input_grad: Optional[torch.Tensor]) -> None:
        if chunk == 1 and self.rank == self.pp - 1:
            self.output_grads[(m, 0)] = input_grad
        elif _destination(self.pp, self.rank, "B", chunk) is not None:
            self._send("B", (m, chunk), input_grad)

    def _send(self, step: str, work: Work, tensor: torch.Tensor) -> None:
        peer = dist.get_process_group_ranks(self.group)[_destination(self.pp, self.rank, step, work[1])]
        handle = dist.isend(tensor, dst=peer, group=self.group)
        if step == "F":
            self.activation_sends[work] = (handle, tensor)
        else:
            self.gradient_sends.append((handle, tensor))

    # Gradient reduction, as megatron's schedules do it.

    def _no_sync(self):
        """megatron's ``no_sync_func`` (one per chunk or one for all): gradients accumulate locally
        until the schedule launches their reduction."""
        funcs = self.config.no_sync_func
        if self.forward_only or funcs is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for func in funcs if isinstance(funcs, list) else [funcs]:
            stack.enter_context(func())
        return stack

    def _finish_gradients(self) -> None:
        self._sum_embedding_copies()
        self._launch_grad_sync()
        if self.config.finalize_model_grads_func is not None:
            tokens = self.total_tokens if self.config.calculate_per_token_loss else None
            self.config.finalize_model_grads_func(self.model, tokens)

    def _sum_embedding_copies(self) -> None:
        """Rank 0 holds the embedding (chunk 0) and MTP's copy of it (chunk 1). megatron keeps such
        copies equal by all-reducing their gradients between ranks; here they share a rank, so their
        gradients are summed in place, before the data-parallel reduction treats each copy alike."""
        first, last = unwrap_model(self.model)
        if not (getattr(first, "pre_process", False) and getattr(last, "mtp_process", False)):
            return
        weights = [m.embedding.word_embeddings.weight for m in (first, last)]
        grads = [w.main_grad if hasattr(w, "main_grad") else w.grad for w in weights]
        if any(g is None for g in grads):
            return
        total = grads[0] + grads[1]
        for grad in grads:
            grad.copy_(total)

    def _launch_grad_sync(self) -> None:
        """megatron's ``grad_sync_func`` (one per chunk or one for all) on every chunk, as its
        schedules do for chunks whose reduction has not started."""
        funcs = self.config.grad_sync_func
        if funcs is None:
            return
        for i, chunk in enumerate(self.model):
            (funcs[i] if isinstance(funcs, list) else funcs)(chunk.parameters())


def forward_backward_dualpipev(*, forward_step_func, data_iterator, model, num_microbatches: int, seq_length: int,
                               micro_batch_size: int, forward_only: bool = False,
                               executed: Optional[List[Op]] = None) -> list:
    """megatron's forward-backward function interface for DualPipeV.

    ``model`` is this rank's two chunks, ``data_iterator`` one iterator per chunk over the
    same micro-batches (each chunk reads every micro-batch once, in order). Returns the
    loss function's outputs on rank 0 (which computes the loss), an empty list elsewhere.
    ``executed``, when given, receives the operations in the order they ran.
    """
    schedule = _DualPipeV(forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
                          forward_only)
    return schedule.run(executed)


def dispatching(original):
    """megatron's ``get_forward_backward_func``, whose function runs DualPipeV for a dualpipev model."""

    def get_forward_backward_func(*args, **kwargs):
        megatron_schedule = original(*args, **kwargs)

        def forward_backward(*, model, **schedule_kwargs):
            chunks = model if isinstance(model, list) else [model]
            if getattr(get_model_config(chunks[0]), "schedules_method", None) != "dualpipev":
                return megatron_schedule(model=model, **schedule_kwargs)
            unsupported = [k for k in ("decoder_seq_length", "collect_non_loss_data", "first_val_step",
                                       "adjust_tensor_shapes_fn", "p2p_communicator", "pg_collection")
                           if schedule_kwargs.pop(k, None)]
            if unsupported:
                raise ValueError(f"the dualpipev schedule does not take {', '.join(unsupported)}")
            return forward_backward_dualpipev(model=chunks, **schedule_kwargs)

        return forward_backward

    return get_forward_backward_func

