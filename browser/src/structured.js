// JSON-schema output in the browser: XGrammar's WebAssembly build (@mlc-ai/web-xgrammar, as WebLLM
// uses; llguidance, the native engine, has no browser build) masks the logits before sampling.
// As natively, numbers get at most MAX_DIGITS digits before and after the point.
import "@mlc-ai/web-xgrammar";  // a UMD build: loaded as an ES module it defines globalThis.xgrammar

const { GrammarCompiler, GrammarMatcher, TokenizerInfo } = globalThis.xgrammar;

const MAX_DIGITS = 16;
// Built once per page, on the first schema (vocab.json). `never`: tokens with raw control characters or
// bytes that no UTF-8 text holds, which compact JSON never contains but XGrammar's string rule admits.
let compiler = null, startsWithDigit = null, never = null;

async function compilerFor(base, manifest) {
  if (compiler === null) {
    const vocab = await (await fetch(base + "vocab.json")).json();
    const info = await TokenizerInfo.createTokenizerInfo(vocab.tokens, vocab.type, false, manifest.vocab_size,
                                                         manifest.stop_ids);
    startsWithDigit = new Uint8Array(manifest.vocab_size);
    for (const i of vocab.digit_first) startsWithDigit[i] = 1;
    never = new Uint8Array(manifest.vocab_size);
    for (const i of vocab.never) never[i] = 1;
    compiler = await GrammarCompiler.createGrammarCompiler(info);
  }
  return compiler;
}

export class JsonConstraint {
  static async create(base, manifest, schema) {
    const text = typeof schema === "string" ? schema : JSON.stringify(schema);
    const compiled = await (await compilerFor(base, manifest)).compileJSONSchema(text, false, -1, [", ", ": "]);
    const self = new JsonConstraint();
    self.matcher = await GrammarMatcher.createGrammarMatcher(compiled);
    compiled.dispose();
    self.inString = false; self.escaped = false; self.digits = 0;
    return self;
  }

  get done() { return this.matcher.isTerminated(); }

  // Sets the logits of every token the grammar forbids to -Infinity, in place.
  async mask(logits) {
    const bits = await this.matcher.getNextTokenBitmask();
    const allowed = new Uint8Array(logits.length);
    let clean = 0, other = 0;  // allowed tokens without control characters; of those, not starting with a digit
    for (let i = 0; i < logits.length; i++) {
      if ((bits[i >>> 5] >>> (i & 31)) & 1) {
        allowed[i] = 1;
        if (!never[i]) { clean++; if (!startsWithDigit[i]) other++; }
      }
    }
    const capDigits = this.digits >= MAX_DIGITS && other > 0;
    for (let i = 0; i < logits.length; i++) {
      if (!allowed[i] || (clean > 0 && never[i]) || (capDigits && startsWithDigit[i])) logits[i] = -Infinity;
    }
  }

  accept(token, text) {
    if (!this.matcher.acceptToken(token)) throw new Error(`the grammar refused token ${token}`);
    for (const c of text) {  // follow strings and digit runs, as structured.py does
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === "\\") this.escaped = true;
        else if (c === '"') this.inString = false;
      } else if (c === '"') { this.inString = true; this.digits = 0; }
      else if (c >= "0" && c <= "9") this.digits += 1;
      else this.digits = 0;
    }
  }

  dispose() { this.matcher.dispose(); }
}
