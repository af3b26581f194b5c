// A masked client WebSocket frame (RFC 6455 §5.2) with a payload under 126 bytes, for the
// RFC 8441 peers (h2_websocket_client.js, h2_websocket_lifecycle.js).
module.exports = function frame(op, payload) {
  const mask = Buffer.from([1, 2, 3, 4]);
  const b = Buffer.from(payload);
  const m = Buffer.alloc(b.length);
  for (let i = 0; i < b.length; i++) m[i] = b[i] ^ mask[i % 4];
  return Buffer.concat([Buffer.from([0x80 | op, 0x80 | b.length]), mask, m]);
};
