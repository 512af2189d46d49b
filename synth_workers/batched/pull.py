"""Taking a batch off Redis: the first message by kombu's blocking ``BRPOP``, up to N - 1
more in one round trip, in the priority order ``BRPOP`` itself uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Pop up to ARGV[1] messages from KEYS in order (each key oldest first); returns a flat
#: list of key, message pairs. ``RPOP key count`` needs Redis 6.2 or later.
POP_MANY = """
local want = tonumber(ARGV[1])
local out = {}
for _, key in ipairs(KEYS) do
  if want <= 0 then break end
  local got = redis.call('RPOP', key, want)
  if got then
    for _, item in ipairs(got) do
      out[#out + 1] = key
      out[#out + 1] = item
    end
    want = want - #got
  end
end
return out
"""


@dataclass
class Batch:
    """The messages of one fetch, delivered one by one; ``size`` of them in all."""

    size: int
    delivered: int = 0
    #: Set by the consumer: what it collected while the batch was delivered.
    calls: list[Any] = field(default_factory=list)

    @property
    def last(self) -> bool:
        """Whether the message being delivered is the batch's last."""
        return self.delivered >= self.size


def pop_more(client: Any, keys: list[str], count: int) -> list[tuple[str, bytes]]:
    """Up to ``count`` more messages from ``keys`` (priority order): (key, raw) pairs."""
    if count <= 0 or not keys:
        return []
    script = getattr(client, "_synth_pop_many", None)
    if script is None:
        script = client.register_script(POP_MANY)
        client._synth_pop_many = script
    flat = script(keys=keys, args=[count])
    return [(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
