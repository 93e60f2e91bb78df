// Rewrites a screenshot as a 256-colour palette PNG (median cut, no dithering) so that the copies
// committed under eval/screenshots/ stay small. Reads 8-bit RGB/RGBA non-interlaced PNGs (what
// Chromium writes); node's zlib only, no packages.
//   node png8.mjs IN.png OUT.png
import { readFileSync, writeFileSync } from "node:fs";
import { inflateSync, deflateSync } from "node:zlib";

const CRC = new Int32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c;
});
function crc32(buf) {
  let c = -1;
  for (const b of buf) c = CRC[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

function decode(png) {
  if (png.readUInt32BE(0) !== 0x89504e47) throw new Error("not a PNG");
  let off = 8, width = 0, height = 0, depth = 0, type = 0, interlace = 0;
  const idat = [];
  while (off < png.length) {
    const len = png.readUInt32BE(off), kind = png.toString("latin1", off + 4, off + 8), data = png.subarray(off + 8, off + 8 + len);
    if (kind === "IHDR") { width = data.readUInt32BE(0); height = data.readUInt32BE(4); depth = data[8]; type = data[9]; interlace = data[12]; }
    else if (kind === "IDAT") idat.push(data);
    else if (kind === "IEND") break;
    off += 12 + len;
  }
  const channels = { 2: 3, 6: 4 }[type];
  if (depth !== 8 || !channels || interlace) throw new Error(`unsupported PNG (depth ${depth}, colour type ${type}, interlace ${interlace})`);
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels, out = Buffer.alloc(width * height * 3);
  let prev = Buffer.alloc(stride), cur = Buffer.alloc(stride);
  for (let y = 0; y < height; y++) {
    const f = raw[y * (stride + 1)], line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? cur[i - channels] : 0, b = prev[i], c = i >= channels ? prev[i - channels] : 0;
      let p;
      switch (f) {
        case 0: p = 0; break;
        case 1: p = a; break;
        case 2: p = b; break;
        case 3: p = (a + b) >> 1; break;
        case 4: { const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c); p = pa <= pb && pa <= pc ? a : pb <= pc ? b : c; break; }
        default: throw new Error("bad filter " + f);
      }
      cur[i] = (line[i] + p) & 0xff;
    }
    for (let x = 0; x < width; x++) cur.copy(out, (y * width + x) * 3, x * channels, x * channels + 3);
    [prev, cur] = [cur, prev];
  }
  return { width, height, rgb: out };
}

// median cut over the colour histogram, weighted by pixel count
function quantize(rgb, n) {
  const hist = new Map();
  for (let i = 0; i < rgb.length; i += 3) { const k = (rgb[i] << 16) | (rgb[i + 1] << 8) | rgb[i + 2]; hist.set(k, (hist.get(k) || 0) + 1); }
  const colors = [...hist.entries()].map(([k, count]) => ({ c: [k >> 16, (k >> 8) & 255, k & 255], count, key: k }));
  const boxOf = (cs) => {
    const lo = [255, 255, 255], hi = [0, 0, 0];
    let total = 0;
    for (const { c, count } of cs) { for (let j = 0; j < 3; j++) { lo[j] = Math.min(lo[j], c[j]); hi[j] = Math.max(hi[j], c[j]); } total += count; }
    const range = hi.map((h, j) => h - lo[j]);
    const axis = range.indexOf(Math.max(...range));
    return { cs, axis, range: range[axis], total };
  };
  const boxes = [boxOf(colors)];
  while (boxes.length < n) {
    let best = -1, score = 0;
    boxes.forEach((b, i) => { const s = b.cs.length > 1 ? b.range * Math.sqrt(b.total) : 0; if (s > score) { score = s; best = i; } });
    if (best < 0) break;
    const b = boxes[best];
    b.cs.sort((x, y) => x.c[b.axis] - y.c[b.axis]);
    let acc = 0, cut = 1;
    for (let i = 0; i < b.cs.length - 1; i++) { acc += b.cs[i].count; cut = i + 1; if (acc >= b.total / 2) break; }
    boxes.splice(best, 1, boxOf(b.cs.slice(0, cut)), boxOf(b.cs.slice(cut)));
  }
  const palette = Buffer.alloc(boxes.length * 3), index = new Map();
  boxes.forEach((b, i) => {
    const m = [0, 0, 0];
    for (const { c, count } of b.cs) for (let j = 0; j < 3; j++) m[j] += c[j] * count;
    for (let j = 0; j < 3; j++) palette[i * 3 + j] = Math.round(m[j] / b.total);
    for (const { key } of b.cs) index.set(key, i);
  });
  return { palette, index };
}

function chunk(kind, data) {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(kind, 4, "latin1");
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])), 0);
  return Buffer.concat([head, data, crc]);
}

const [input, output] = process.argv.slice(2);
if (!input || !output) { console.error("usage: node png8.mjs IN.png OUT.png"); process.exit(2); }
const { width, height, rgb } = decode(readFileSync(input));
const { palette, index } = quantize(rgb, 256);
const rows = Buffer.alloc(height * (width + 1));
for (let y = 0; y < height; y++) {
  for (let x = 0; x < width; x++) {
    const i = (y * width + x) * 3;
    rows[y * (width + 1) + 1 + x] = index.get((rgb[i] << 16) | (rgb[i + 1] << 8) | rgb[i + 2]);
  }
}
const ihdr = Buffer.alloc(13);
ihdr.writeUInt32BE(width, 0); ihdr.writeUInt32BE(height, 4); ihdr[8] = 8; ihdr[9] = 3;
writeFileSync(output, Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk("IHDR", ihdr),
  chunk("PLTE", palette), chunk("IDAT", deflateSync(rows, { level: 9 })), chunk("IEND", Buffer.alloc(0))]));
