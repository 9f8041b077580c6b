"""``tcp``: KV streamed over a socket as encoded layer frames; works across hosts.

The body of each LAYER frame is the codec's parts back to back; they are decoded and written
into the reserved blocks as they arrive, so a pipelined sender's layers land while its prefill
is still running.
"""

from __future__ import annotations

import socket
from typing import ClassVar

from pdserve.engine.handoff import HandoffHeader
from pdserve.transfer.codec_choice import AUTO
from pdserve.transfer.codecs import get_codec
from pdserve.transfer.connector import KVConnector, PullTarget
from pdserve.transfer.errors import FailureReason, TransferError
from pdserve.transfer.wire import Deadline, Frame, Kind, expect, recv_frame_skipping_waits


class TcpConnector(KVConnector):
    name: ClassVar[str] = "tcp"
    data_mode: ClassVar[str] = "stream"

    def _receive_data(
        self,
        sock: socket.socket,
        head: Frame,
        header: HandoffHeader,
        block_table: list[int],
        target: PullTarget,
        deadline: Deadline,
    ) -> dict[str, int]:
        stream_codec = str(head.meta.get("codec", "none"))
        # Under auto each frame names its codec; else every frame is in the header's.
        codec = None if stream_codec == AUTO else get_codec(stream_codec)
        layout = self.layout
        received_upto = [0] * layout.num_layers
        bytes_by_codec: dict[str, int] = {}
        while min(received_upto) < header.num_tokens:
            frame = expect(recv_frame_skipping_waits(sock, deadline), Kind.LAYER)
            layer, start, end = int(frame.meta["layer"]), int(frame.meta["start"]), int(frame.meta["end"])
            if not (
                0 <= layer < layout.num_layers and start <= received_upto[layer] and start < end <= header.num_tokens
            ):
                raise TransferError(
                    FailureReason.PROTOCOL,
                    f"layer frame out of order: layer {layer}, positions [{start}, {end}) "
                    f"after [0, {received_upto[layer] if 0 <= layer < layout.num_layers else '?'})",
                )
            shape = (2, end - start, layout.num_kv_heads, layout.head_dim)
            # The frame's buffer is this iteration's alone, so the decoded KV may alias it.
            frame_codec = codec or get_codec(str(frame.meta.get("codec")))
            kv = frame_codec.decode(_split(frame.body, frame.meta["parts"]), shape, layout.dtype, may_alias=True)
            target.write(block_table, layer, start, kv)
            received_upto[layer] = max(received_upto[layer], end)
            bytes_by_codec[frame_codec.name] = bytes_by_codec.get(frame_codec.name, 0) + frame.body.nbytes
        return bytes_by_codec


def _split(body: memoryview, sizes: list[int]) -> list[memoryview]:
    if sum(sizes) != body.nbytes:
        raise TransferError(FailureReason.CORRUPT, f"layer frame parts {sizes} do not add up to {body.nbytes} bytes")
    parts, offset = [], 0
    for size in sizes:
        parts.append(body[offset : offset + size])
        offset += size
    return parts
