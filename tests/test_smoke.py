"""A first end-to-end check: watch, publish, receive."""

from tests.conftest import Service, chunk, watch_path
from tests.sseclient import request


async def test_watch_receives_published_chunk(svc: Service) -> None:
    (seed,) = await svc.seed()
    response = await request(svc.port, watch_path(seed.conversation_id), token=seed.token)
    assert response.status == 200
    assert await response.next_frame() == b":ok"
    pub = await svc.publisher()
    await pub.publish(f"chat.chunk.{seed.conversation_id}", chunk("token", text="hi"))
    frame = await response.next_frame()
    assert frame == b'data: {"event":"token","data":{"chunk_type": "token", "text": "hi"}}'
    await pub.aclose()
    await response.aclose()
