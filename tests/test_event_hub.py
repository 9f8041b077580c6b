"""A worker's per-request mailbox stays bounded whatever the reader's pace."""

from __future__ import annotations

import asyncio

from pdserve.serving.event_hub import Mailbox


def _output(text: str, finished: bool = False) -> dict:
    return {"event": "output", "request_id": "r", "finished": finished,
            "outputs": [{"index": 0, "text": text, "finish_reason": "length" if finished else None}]}


def test_a_slow_reader_gets_the_latest_output_not_a_growing_queue() -> None:
    async def run() -> list[dict]:
        mailbox = Mailbox()
        mailbox.put({"event": "kv_received", "request_id": "r"})
        for count in range(1, 1001):  # a thousand tokens while nobody reads
            mailbox.put(_output("x" * count))
        assert len(mailbox) == 2  # the transfer event, and the newest output (cumulative)
        received = [await mailbox.get(), await mailbox.get()]
        mailbox.put(_output("x" * 1001, finished=True))
        received.append(await mailbox.get())
        return received

    kv, latest, last = asyncio.run(run())
    assert kv["event"] == "kv_received"
    assert latest["outputs"][0]["text"] == "x" * 1000 and last["finished"]


def test_a_waiting_reader_wakes_for_each_event() -> None:
    async def run() -> list[str]:
        mailbox = Mailbox()
        reader = asyncio.ensure_future(asyncio.gather(mailbox.get(), mailbox.get()))
        await asyncio.sleep(0)
        mailbox.put({"event": "prefilled", "request_id": "r"})
        await asyncio.sleep(0)
        mailbox.put({"event": "error", "request_id": "r", "status": 500, "message": "m"})
        return [event["event"] for event in await asyncio.wait_for(reader, 5)]

    assert asyncio.run(run()) == ["prefilled", "error"]
