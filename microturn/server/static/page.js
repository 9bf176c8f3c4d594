// microturn's browser client: microphone, camera or typed text in over /v1/stream, both lanes
// live, the spoken output played, and every slice's latency. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const MEDIA_AUDIO = 1, MEDIA_IMAGE = 2;  // the first byte of a binary frame (docs/PROTOCOL.md)
const SPEECH_RATE = 24000, MAX_CELLS = 80, CHUNK_S = 0.1;
const TAP = `class Tap extends AudioWorkletProcessor {
  process(inputs) { const ch = inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
}
registerProcessor("tap", Tap);`;

let ws = null, audio = null, media = null, camera = null;
let playAt = 0, playing = [], latencies = [], heard = 0, sliceMs = 200;

function status(text) { $("status").textContent = text; }

function addCell(lane, text, cls, height) {
  const cell = document.createElement("div");
  cell.className = "cell" + (cls ? " " + cls : "");
  cell.textContent = text;
  cell.title = text;
  if (height !== undefined) cell.style.height = height;
  lane.appendChild(cell);
  while (lane.childElementCount > MAX_CELLS) lane.firstElementChild.remove();
}

function frame(kind, bytes) {
  const out = new Uint8Array(1 + bytes.byteLength);
  out[0] = kind;
  out.set(new Uint8Array(bytes), 1);
  return out;
}

function pcm16(chunks, count) {
  const out = new DataView(new ArrayBuffer(2 * count));
  let at = 0;
  for (const chunk of chunks) {
    for (const x of chunk) {
      out.setInt16(at, Math.max(-1, Math.min(1, x)) * 32767, true);
      at += 2;
    }
  }
  return out.buffer;
}

async function startMicrophone() {
  const url = URL.createObjectURL(new Blob([TAP], { type: "application/javascript" }));
  await audio.audioWorklet.addModule(url);
  const source = audio.createMediaStreamSource(media);
  const tap = new AudioWorkletNode(audio, "tap");
  const mute = audio.createGain();
  mute.gain.value = 0;
  const per = Math.round(audio.sampleRate * CHUNK_S);
  let chunks = [], count = 0;
  tap.port.onmessage = (e) => {
    chunks.push(e.data);
    count += e.data.length;
    if (count >= per && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(frame(MEDIA_AUDIO, pcm16(chunks, count)));
      chunks = [];
      count = 0;
    }
  };
  source.connect(tap).connect(mute).connect(audio.destination);
}

function startCamera() {
  const preview = $("preview"), grab = $("grab"), draw = grab.getContext("2d");
  preview.srcObject = media;
  preview.style.display = "block";
  preview.play();
  camera = setInterval(() => {
    if (!ws || ws.readyState !== WebSocket.OPEN || preview.readyState < 2) return;
    draw.drawImage(preview, 0, 0, grab.width, grab.height);
    grab.toBlob((blob) => blob.arrayBuffer().then((bytes) => {
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(frame(MEDIA_IMAGE, bytes));
    }), "image/jpeg", 0.8);
  }, 500);
}

function play(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes[0] !== MEDIA_AUDIO || !audio) return;
  const pcm = new Int16Array(buffer.slice(1, 1 + 2 * Math.floor((bytes.length - 1) / 2)));
  const clip = audio.createBuffer(1, pcm.length, SPEECH_RATE);
  const samples = clip.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  const source = audio.createBufferSource();
  source.buffer = clip;
  source.connect(audio.destination);
  playAt = Math.max(playAt, audio.currentTime);
  source.start(playAt);
  playAt += clip.duration;
  playing.push(source);
  source.onended = () => { playing = playing.filter((s) => s !== source); };
}

function stopSpeech() {
  for (const source of playing) source.stop();
  playing = [];
  playAt = 0;
}

function onEvent(e) {
  if (e.type === "started") {
    sliceMs = e.slice_ms;
    status(`live · ${e.slice_ms} ms slices`);
  } else if (e.type === "output") {
    // a background result lands in the input; an ask is output that is not speech
    const result = e.result ? `← ${e.result.text}` : "";
    const input = e.input_text || result || (e.input_audio ? "♪" : e.input_frames ? "▣" : "");
    addCell($("in"), input, e.result ? "background" : e.input_text ? "text"
      : e.input_audio ? "audio" : "");
    const asked = e.asks.map((a) => `→ ${a.tool}: ${a.query}`).join(" ");
    const said = e.speech || asked;
    addCell($("out"), said, e.speech ? "text" : asked ? "background" : "");
    const share = Math.min(1, e.latency_ms / sliceMs);
    addCell($("lat"), "", e.missed_deadline ? "late" : "", `${Math.max(2, share * 100)}%`);
    latencies.push(e.latency_ms);
    heard += e.input_audio ? 1 : 0;
    const sorted = [...latencies].sort((a, b) => a - b);
    $("latency").textContent = e.latency_ms.toFixed(1);
    $("p50").textContent = sorted[Math.floor(sorted.length / 2)].toFixed(1);
    $("slices").textContent = latencies.length;
    $("heard").textContent = heard;
  } else if (e.type === "speech_cut") {
    stopSpeech();
  } else if (e.type === "error") {
    status(`error: ${e.message}`);
  } else if (e.type === "ended") {
    stop(`ended: ${e.reason}`);
  }
}

async function start() {
  const mic = $("mic").checked, cam = $("camera").checked, speak = $("speak").checked;
  audio = new AudioContext();
  // raw audio: the model hears the room as it is (no echo cancelling, denoising or gain)
  const raw = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };
  if (mic || cam) media = await navigator.mediaDevices.getUserMedia({ audio: mic && raw, video: cam });
  const options = { type: "start", max_output_tokens: 4 };
  if (mic) options.audio = { sample_rate: audio.sampleRate, channels: 1 };
  if (cam) options.video = { fps: 2 };
  if (speak) options.speech = { sample_rate: SPEECH_RATE };
  const key = $("key").value;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = key ? `?api_key=${encodeURIComponent(key)}` : "";
  ws = new WebSocket(`${scheme}://${location.host}/v1/stream${query}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify(options));
  ws.onmessage = (m) => (typeof m.data === "string" ? onEvent(JSON.parse(m.data)) : play(m.data));
  ws.onclose = (e) => { if (ws) stop(e.code === 1000 ? "closed" : `closed (${e.code})`); };
  $("start").textContent = "Stop";
  status("connecting…");
  if (mic) await startMicrophone();
  if (cam) startCamera();
}

function stop(why) {
  const socket = ws;
  ws = null;
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "end" }));
    socket.close();
  }
  clearInterval(camera);
  if (media) media.getTracks().forEach((t) => t.stop());
  if (audio) audio.close();
  media = audio = camera = null;
  stopSpeech();
  $("start").textContent = "Start";
  status(why || "stopped");
}

$("start").addEventListener("click", () => {
  if (ws) stop();
  else start().catch((err) => stop(`cannot start: ${err.message}`));
});

$("typing").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  if (!ws || ws.readyState !== WebSocket.OPEN) { status("press Start first"); return; }
  // at a speaking pace, two words a slice: the model learnt words as they are spoken
  const words = text.split(/\s+/);
  words.forEach((_, i) => {
    if (i % 2) return;
    setTimeout(() => {
      if (ws && ws.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ type: "input", text: " " + words.slice(i, i + 2).join(" ") }));
      }
    }, (i / 2) * sliceMs);
  });
  $("text").value = "";
});
