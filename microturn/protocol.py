"""Every message and body of the wire protocol, as pydantic models (docs/PROTOCOL.md is the prose).

Client -> server over the WebSocket: `start`, `input`, `end`, `ping` (JSON text frames), and
binary frames of media: one kind byte (`MEDIA_AUDIO`: PCM16 little-endian at the session's
rate and channels; `MEDIA_IMAGE`: one PNG or JPEG image), then the payload. Server -> client:
`started`, `output`, `speech_cut`, `notice`, `error`, `ended`, `pong`, and with `speech` on,
binary frames of the spoken output (`MEDIA_AUDIO`, PCM16 mono at `speech.sample_rate`). The
HTTP API reuses the same pieces.
Models are strict: a string where a number belongs is an error, not a conversion, and unknown
fields are refused.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

MAX_SEED = 2**63 - 1
MEDIA_AUDIO = 0x01  # first byte of a binary frame of PCM16 audio
MEDIA_IMAGE = 0x02  # first byte of a binary frame holding one PNG or JPEG image


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AudioOptions(Strict):
    sample_rate: int = Field(16_000, ge=1_000, le=384_000, description="of the PCM16 sent; "
                             "other than 16000 is resampled on the server")
    channels: int = Field(1, ge=1, le=8, description="interleaved; averaged to mono")


class VideoOptions(Strict):
    fps: float = Field(2.0, gt=0.0, le=30.0, description="frames per second of session time "
                       "(each resized to 160x120: 12 patches of 40x40)")


class SpeechOptions(Strict):
    voice: str = Field("en-us", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9+-]+$",
                       description="an espeak-ng voice")
    sample_rate: int = Field(24_000, ge=8_000, le=48_000, description="of the PCM16 sent back")
    words_per_minute: int = Field(175, ge=80, le=450)


class SessionOptions(Strict):
    """What a client chooses when it opens a session (WebSocket `start`, POST /v1/sessions)."""
    slice_ms: int = Field(200, ge=20, le=10_000, description="length of one micro-turn")
    max_output_tokens: int = Field(8, ge=1, le=256, description="per output slice")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 is greedy")
    top_k: int = Field(0, ge=0, le=1_000_000, description="0: no top-k cut")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    force_output: bool = Field(False, description="emit exactly max_output_tokens every "
                               "slice, ignoring end-of-slice and silence (benchmarks)")
    deterministic: bool | None = Field(
        None, description="true: batch-invariant kernels for every tick this session is in "
                          "(log-probabilities bitwise the trainer's); null: the server's mode")
    audio: AudioOptions | None = Field(None, description="every input slice carries audio "
                                       "(slice_ms must be a multiple of 12.5)")
    video: VideoOptions | None = Field(None, description="every input slice carries video")
    speech: SpeechOptions | None = Field(None, description="WebSocket only: the output lane "
                                         "spoken (espeak-ng), as binary PCM16 frames")
    resume: dict | None = Field(None, description="a session export (an `ended` event's, or "
                                "a checkpoint) to continue: its history is fed again and the "
                                "session goes on from its next slice, with the export's "
                                "slice_ms, output budget and sampling")
    resume_session: str | None = Field(None, min_length=1, max_length=64,
                                       pattern=r"^[A-Za-z0-9_-]+$",
                                       description="continue this session from the server's "
                                       "last checkpoint of it (serve --checkpoint-dir)")


# -- client -> server (WebSocket) ------------------------------------------------------------

class StartMessage(SessionOptions):
    type: Literal["start"]
    clock: Literal["server", "client"] = Field(
        "server", description="server: a slice closes every slice_ms on the server's clock; "
                              "client: each input message is one whole slice, answered at once")


class InputMessage(Strict):
    type: Literal["input"]
    text: str = Field("", description="text that arrived; tokenized on arrival")
    tokens: list[int] | None = Field(None, description="token ids instead of text")
    slice: int | None = Field(None, ge=0, description="the slice index this input belongs to")


class EndMessage(Strict):
    type: Literal["end"]
    export: bool = Field(False, description="include the session export (verify-alignment)")


class PingMessage(Strict):
    type: Literal["ping"]


class RetractMessage(Strict):
    """The user took a question back: cancel the background job of this ask."""
    type: Literal["retract"]
    ask: int = Field(ge=1, description="the id of an ask from an output event's `asks`")


ClientMessage = Annotated[StartMessage | InputMessage | EndMessage | PingMessage | RetractMessage,
                          Field(discriminator="type")]
client_message = TypeAdapter(ClientMessage)


# -- server -> client --------------------------------------------------------------------------

class Limits(BaseModel):
    max_sessions: int
    max_message_bytes: int
    max_media_bytes: int
    max_input_tokens: int
    max_buffered_slices: int
    idle_timeout_s: float
    start_timeout_s: float
    body_timeout_s: float
    header_timeout_s: float


class StartedEvent(BaseModel):
    type: Literal["started"] = "started"
    session: str
    clock: Literal["server", "client"]
    slice_ms: int
    max_output_tokens: int
    deterministic: bool
    first_slice_closes_in_ms: float | None = Field(
        None, description="server clock: when slice 0 closes, from this event's sending")
    audio_frames_per_slice: int | None = Field(
        None, description="dMel positions each slice's audio segment holds (16 at 200 ms)")
    video_patches_per_frame: int | None = Field(None, description="40x40 patches per frame")
    resumed_from: int | None = Field(None, description="a resumed session: its first slice "
                                     "from now on (the slices before it came from the export)")
    limits: Limits


class AskInfo(BaseModel):
    """An ask the model closed in this slice's output, handed to the background worker."""
    id: int
    tool: str = Field(description="the tool that took it, or \"model\": the background model")
    query: str


class ResultInfo(BaseModel):
    """A background result that landed in this slice's input."""
    id: int = Field(description="the ask's id")
    tool: str
    state: Literal["done", "error", "timeout"]
    text: str = Field(description="what the model was told (an error is a sentence too)")
    seconds: float | None = Field(None, description="ask -> result ready")


class OutputEvent(BaseModel):
    type: Literal["output"] = "output"
    slice: int
    input_tokens: list[int] = Field(description="what the slice's input held (empty: silence)")
    input_text: str
    input_audio: bool | None = Field(None, description="audio sessions: the slice carried "
                                     "audio (false: absent, its samples had not all arrived)")
    input_frames: int | None = Field(None, description="video sessions: frames carried")
    tokens: list[int]
    text: str
    speech: str = Field("", description="text without the model's <ask> segments: what is "
                        "said (spoken aloud in speech sessions)")
    asks: list[AskInfo] = Field(default_factory=list)
    result: ResultInfo | None = Field(None, description="a background result fed in this "
                                      "slice's input")
    latency_ms: float = Field(description="slice closed (or request arrived) -> output ready")
    missed_deadline: bool = Field(description="latency_ms > slice_ms")


class RetractedEvent(BaseModel):
    type: Literal["retracted"] = "retracted"
    ask: int = Field(description="its job was cancelled: no result will land")


class NoticeEvent(BaseModel):
    type: Literal["notice"] = "notice"
    code: Literal["late_input", "spilled_input"]
    message: str
    slice: int = Field(description="the first slice the input landed in")


class ErrorInfo(BaseModel):
    code: str
    field: str | None = None
    message: str
    limit: float | int | str | None = None


class ErrorEvent(ErrorInfo):
    type: Literal["error"] = "error"


class SessionSummary(BaseModel):
    slices: int
    input_tokens: int
    output_tokens: int
    deadline_misses: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    seconds: float


class EndedEvent(BaseModel):
    type: Literal["ended"] = "ended"
    reason: Literal["client", "disconnected", "idle", "shutdown", "slow_consumer",
                    "kv_pool_full", "moved"]
    summary: SessionSummary
    export: dict[str, Any] | None = None


class PongEvent(BaseModel):
    type: Literal["pong"] = "pong"


class SpeechCutEvent(BaseModel):
    """The model stopped mid-sentence (interrupted): drop speech not yet played."""
    type: Literal["speech_cut"] = "speech_cut"
    slice: int


ServerEvent = Annotated[StartedEvent | OutputEvent | NoticeEvent | ErrorEvent | EndedEvent
                        | PongEvent | SpeechCutEvent | RetractedEvent,
                        Field(discriminator="type")]
server_event = TypeAdapter(ServerEvent)


# -- HTTP bodies -------------------------------------------------------------------------------

class SliceRequest(Strict):
    text: str = Field("", description="the slice's input text; empty and no tokens: silence")
    tokens: list[int] | None = None


class SessionState(BaseModel):
    session: str
    clock: Literal["server", "client"]
    slices: int = Field(description="micro-turns answered")
    pending_slices: int
    input_tokens: int
    output_tokens: int
    sequence_tokens: int = Field(description="tokens of the session's timeline so far")
    kv_slots: int = Field(description="KV slots resident (after any eviction)")
    kv_blocks: int
    evictions: int
    idle_s: float


class ErrorBody(BaseModel):
    error: ErrorInfo


class ReplicaHealth(BaseModel):
    """One replica of `serve --replicas N`, as it last reported (every second)."""
    name: str
    status: Literal["ok", "draining"]
    sessions: int
    tick_headroom: float = Field(description="the part of a 200 ms slice its recent ticks "
                                             "leave free (90th percentile)")
    kv_blocks_free: int
    pid: int
    reported_s_ago: float


class Health(BaseModel):
    status: Literal["ok", "draining"]
    sessions: int
    kv_blocks_free: int
    kv_blocks_total: int
    replica: str | None = Field(None, description="`serve --replicas`: the replica answering")
    replicas: list[ReplicaHealth] | None = Field(None, description="`serve --replicas`: every "
                                                 "live replica")


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replica: str = Field(min_length=1, max_length=64, description="a replica's name (/healthz)")


class DrainReply(BaseModel):
    replica: str
    status: Literal["draining"] = "draining"
