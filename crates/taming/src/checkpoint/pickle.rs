//! A small pickle virtual machine: the subset of CPython's `Lib/pickle.py` `_Unpickler` (protocols 0 to 5)
//! that `torch.save` and PyTorch Lightning checkpoints use, turning a pickle stream into a generic
//! [`Value`] tree. Nothing is imported or executed: globals stay names ([`Value::Global`]), calls stay
//! records of what would have been called ([`Value::Object`]), persistent ids stay
//! [`Value::PersistentId`] for the torch layer (`super::torch`) to interpret.
//!
//! Sharing: as in CPython, the stack and the memo hold references to the same cells, so a container
//! that is memoized (`BINPUT`, `MEMOIZE`) and filled afterwards (`SETITEMS`, `APPENDS`, `BUILD`) is seen
//! complete by every later `BINGET`. When a shared cell becomes part of a parent it is copied, which
//! is equivalent to sharing for the acyclic data checkpoints hold; a self-referencing container holds
//! a snapshot of itself taken at the point of recursion, so decoding never loops. Copies are counted
//! against a budget proportional to the stream's length, so a small hostile pickle cannot expand
//! into an enormous tree.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// A value decoded from a pickle stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Python `None`.
    None,
    /// Python `bool`.
    Bool(bool),
    /// A Python `int` that fits in 64 bits.
    Int(i64),
    /// A Python `int` beyond 64 bits: little-endian two's complement bytes, as `LONG1`/`LONG4` store them.
    BigInt(Vec<u8>),
    /// Python `float`.
    Float(f64),
    /// Python `str` (and protocol-0/1 `STRING`s, which Python 3 decodes to `str`).
    Str(String),
    /// Python `bytes` or `bytearray`.
    Bytes(Vec<u8>),
    /// Python `tuple`.
    Tuple(Vec<Value>),
    /// Python `list`.
    List(Vec<Value>),
    /// Python `dict`, in insertion order. Keys can be any value (Lightning keys `callbacks` by a class).
    Dict(Vec<(Value, Value)>),
    /// Python `set`.
    Set(Vec<Value>),
    /// Python `frozenset`.
    FrozenSet(Vec<Value>),
    /// A class or function named by `GLOBAL`/`STACK_GLOBAL` (never imported).
    Global { module: String, name: String },
    /// The result of calling something (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `INST`, `OBJ`), with whatever
    /// `APPEND`/`SETITEM`/`BUILD` later did to it.
    Object(Box<Object>),
    /// `BUILD` applied to a value that is not an [`Object`].
    Build { obj: Box<Value>, state: Box<Value> },
    /// A persistent id (`PERSID`, `BINPERSID`); torch uses them to refer to tensor storages.
    PersistentId(Box<Value>),
}

/// How an [`Object`] was created.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectKind {
    /// `REDUCE`: `callable(*args)`.
    Reduce,
    /// `NEWOBJ`: `cls.__new__(cls, *args)`.
    NewObj,
    /// `NEWOBJ_EX`: `cls.__new__(cls, *args, **kwargs)`.
    NewObjEx { kwargs: Value },
    /// `INST` / `OBJ` (protocols 0 and 1): `cls(*args)`.
    Inst,
}

/// A call recorded by the VM, plus the items and state later given to its result.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// What was called, usually a [`Value::Global`].
    pub callable: Value,
    /// The positional arguments, usually a [`Value::Tuple`].
    pub args: Value,
    /// The opcode family that made it.
    pub kind: ObjectKind,
    /// The argument of `BUILD` (`__setstate__`), if any.
    pub state: Option<Value>,
    /// Items added by `APPEND`/`APPENDS`.
    pub list_items: Vec<Value>,
    /// Items added by `SETITEM`/`SETITEMS` (e.g. the entries of a `collections.OrderedDict`).
    pub dict_items: Vec<(Value, Value)>,
}

impl Value {
    /// The string, if this is a [`Value::Str`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is a [`Value::Int`] (or a `bool`, which Python treats as an int).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// `(module, name)`, if this is a [`Value::Global`].
    pub fn as_global(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The elements of a tuple or list.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// The number of values in this tree (this value included).
    pub fn node_count(&self) -> usize {
        1 + self.children().map(Value::node_count).sum::<usize>()
    }

    /// The direct children of this value, in order (keys before values for dict entries).
    pub fn children(&self) -> Box<dyn Iterator<Item = &Value> + '_> {
        match self {
            Value::Tuple(v) | Value::List(v) | Value::Set(v) | Value::FrozenSet(v) => {
                Box::new(v.iter())
            }
            Value::Dict(items) => Box::new(items.iter().flat_map(|(k, v)| [k, v])),
            Value::Object(o) => Box::new(
                [&o.callable, &o.args]
                    .into_iter()
                    .chain(match &o.kind {
                        ObjectKind::NewObjEx { kwargs } => Some(kwargs),
                        _ => None,
                    })
                    .chain(o.state.as_ref())
                    .chain(o.list_items.iter())
                    .chain(o.dict_items.iter().flat_map(|(k, v)| [k, v])),
            ),
            Value::Build { obj, state } => Box::new([obj.as_ref(), state.as_ref()].into_iter()),
            Value::PersistentId(v) => Box::new(std::iter::once(v.as_ref())),
            _ => Box::new(std::iter::empty()),
        }
    }
}

/// Why a pickle stream could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    /// Byte offset (within the stream given to [`load`]) of the opcode at fault.
    pub offset: usize,
    /// What went wrong.
    pub msg: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pickle byte offset {})", self.msg, self.offset)
    }
}

impl std::error::Error for PickleError {}

/// A decoded pickle.
#[derive(Debug, Clone, PartialEq)]
pub struct Unpickled {
    /// The value returned by `STOP`.
    pub value: Value,
    /// The offset just past the `STOP` opcode (where a following pickle would start).
    pub end: usize,
    /// The protocol announced by `PROTO` (0 when there is none).
    pub protocol: u8,
}

/// Decodes the pickle starting at `data[0]`, stopping at its `STOP` opcode.
pub fn load(data: &[u8]) -> Result<Unpickled, PickleError> {
    Machine::new(data).run()
}

type Cell = Rc<RefCell<Value>>;

fn cell(v: Value) -> Cell {
    Rc::new(RefCell::new(v))
}

/// Names of the opcodes, for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed.
    op_pos: usize,
    op: u8,
    stack: Vec<Cell>,
    metastack: Vec<Vec<Cell>>,
    memo: HashMap<u64, Cell>,
    protocol: u8,
    /// How many more values copying shared cells may create.
    copy_budget: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine {
            data,
            pos: 0,
            op_pos: 0,
            op: 0,
            stack: Vec::new(),
            metastack: Vec::new(),
            memo: HashMap::new(),
            protocol: 0,
            copy_budget: (1 << 22) + data.len().saturating_mul(16),
        }
    }

    fn err(&self, msg: impl Into<String>) -> PickleError {
        PickleError {
            offset: self.op_pos,
            msg: format!(
                "{} (opcode {} 0x{:02x})",
                msg.into(),
                opcode_name(self.op),
                self.op
            ),
        }
    }

    // ---- reading the stream ----

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let data: &'a [u8] = self.data;
        let left = data.len() - self.pos;
        if n > left {
            return Err(self.err(format!(
                "truncated pickle: needs {n} more bytes, {left} left"
            )));
        }
        let s = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len_u32(&mut self) -> Result<usize, PickleError> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn len_u64(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.err(format!("length {n} does not fit in memory")))
    }

    /// A protocol-0 text argument: the bytes up to (not including) the next `\n`.
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => Err(self.err("truncated pickle: text argument without its newline")),
        }
    }

    fn line_str(&mut self) -> Result<String, PickleError> {
        let line = self.line()?;
        Ok(String::from_utf8_lossy(line).into_owned())
    }

    // ---- the stack ----

    fn push(&mut self, v: Value) {
        self.stack.push(cell(v));
    }

    fn pop_cell(&mut self) -> Result<Cell, PickleError> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    /// Pops the top of the stack as an owned value (copied if the memo shares it).
    fn pop(&mut self) -> Result<Value, PickleError> {
        let c = self.pop_cell()?;
        self.own(c)
    }

    fn top(&self) -> Result<&Cell, PickleError> {
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }

    /// The value of a cell, moved out if nothing else refers to it, else copied within the budget.
    fn own(&mut self, c: Cell) -> Result<Value, PickleError> {
        match Rc::try_unwrap(c) {
            Ok(cell) => Ok(cell.into_inner()),
            Err(shared) => {
                let v = shared
                    .try_borrow()
                    .map_err(|_| self.err("value is being modified while it is read"))?;
                // Count before copying, so that an oversized copy is never allocated.
                let n = v.node_count();
                if n > self.copy_budget {
                    return Err(self.err(
                        "memoized values are referenced so often that the decoded tree would be too large",
                    ));
                }
                self.copy_budget -= n;
                Ok(v.clone())
            }
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let prev = self
            .metastack
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = std::mem::replace(&mut self.stack, prev);
        items.into_iter().map(|c| self.own(c)).collect()
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let c = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.stack.push(c);
        Ok(())
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let c = self.top()?.clone();
        self.memo.insert(key, c);
        Ok(())
    }

    /// Runs `f` on the (mutable) value at the top of the stack.
    fn with_top<T>(
        &mut self,
        f: impl FnOnce(&mut Value) -> Result<T, String>,
    ) -> Result<T, PickleError> {
        let top = self.top()?.clone();
        let mut guard = top
            .try_borrow_mut()
            .map_err(|_| self.err("value is already being modified"))?;
        f(&mut guard).map_err(|m| self.err(m))
    }

    fn append_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        self.with_top(|target| match target {
            Value::List(v) | Value::Set(v) => {
                v.extend(items);
                Ok(())
            }
            Value::Object(o) => {
                o.list_items.extend(items);
                Ok(())
            }
            other => Err(format!("cannot append to {}", kind_name(other))),
        })
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of items for a dict"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        self.with_top(|target| match target {
            Value::Dict(d) => {
                d.extend(pairs);
                Ok(())
            }
            Value::Object(o) => {
                o.dict_items.extend(pairs);
                Ok(())
            }
            other => Err(format!("cannot set items of {}", kind_name(other))),
        })
    }

    fn push_object(&mut self, callable: Value, args: Value, kind: ObjectKind) {
        self.push(Value::Object(Box::new(Object {
            callable,
            args,
            kind,
            state: None,
            list_items: Vec::new(),
            dict_items: Vec::new(),
        })));
    }

    fn int_from_le(&self, bytes: &[u8]) -> Value {
        int_from_le(bytes)
    }

    // ---- the interpreter ----

    fn run(mut self) -> Result<Unpickled, PickleError> {
        loop {
            self.op_pos = self.pos;
            self.op = 0;
            let op = self.byte().map_err(|_| {
                self.err("truncated pickle: the stream ends before its STOP opcode")
            })?;
            self.op = op;
            match op {
                // -- framing and control --
                0x80 => self.protocol = self.byte()?,
                0x95 => {
                    // FRAME: an 8-byte length of the frame that follows; frames are only a read hint.
                    self.take(8)?;
                }
                b'.' => {
                    let value = self.pop()?;
                    return Ok(Unpickled {
                        value,
                        end: self.pos,
                        protocol: self.protocol,
                    });
                }
                b'(' => {
                    let stack = std::mem::take(&mut self.stack);
                    self.metastack.push(stack);
                }
                b'0' => {
                    if self.stack.pop().is_none() {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?.clone();
                    self.stack.push(top);
                }
                // -- constants and numbers --
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'I' => {
                    let line = self.line()?;
                    let v = match line {
                        b"00" => Value::Bool(false),
                        b"01" => Value::Bool(true),
                        _ => parse_decimal(line).ok_or_else(|| self.err("malformed INT"))?,
                    };
                    self.push(v);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.byte()?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                b'L' => {
                    let line = self.line()?;
                    let line = line.strip_suffix(b"L").unwrap_or(line);
                    let v = parse_decimal(line).ok_or_else(|| self.err("malformed LONG"))?;
                    self.push(v);
                }
                0x8a => {
                    let n = usize::from(self.byte()?);
                    let bytes = self.take(n)?;
                    let v = self.int_from_le(bytes);
                    self.push(v);
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("negative LONG4 length"))?;
                    let bytes = self.take(n)?;
                    let v = self.int_from_le(bytes);
                    self.push(v);
                }
                b'F' => {
                    let line = self.line_str()?;
                    let v: f64 = line
                        .trim()
                        .parse()
                        .map_err(|_| self.err(format!("malformed FLOAT {line:?}")))?;
                    self.push(Value::Float(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v));
                }
                // -- strings and bytes --
                b'S' => {
                    let line = self.line()?;
                    let s = parse_quoted(line).ok_or_else(|| self.err("malformed STRING"))?;
                    self.push(Value::Str(String::from_utf8_lossy(&s).into_owned()));
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n =
                        usize::try_from(n).map_err(|_| self.err("negative BINSTRING length"))?;
                    let s = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
                }
                b'U' => {
                    let n = usize::from(self.byte()?);
                    let s = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
                }
                b'V' => {
                    let line = self.line()?;
                    self.push(Value::Str(raw_unicode_escape(line)));
                }
                b'X' => {
                    let n = self.len_u32()?;
                    let s = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
                }
                0x8c => {
                    let n = usize::from(self.byte()?);
                    let s = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let s = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(s).into_owned()));
                }
                b'B' => {
                    let n = self.len_u32()?;
                    let s = self.take(n)?;
                    self.push(Value::Bytes(s.to_vec()));
                }
                b'C' => {
                    let n = usize::from(self.byte()?);
                    let s = self.take(n)?;
                    self.push(Value::Bytes(s.to_vec()));
                }
                0x8e | 0x96 => {
                    let n = self.len_u64()?;
                    let s = self.take(n)?;
                    self.push(Value::Bytes(s.to_vec()));
                }
                // -- containers --
                b')' => self.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let cells = self.stack.split_off(self.stack.len() - n);
                    let items = cells
                        .into_iter()
                        .map(|c| self.own(c))
                        .collect::<Result<_, _>>()?;
                    self.push(Value::Tuple(items));
                }
                b']' => self.push(Value::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append_items(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append_items(items)?;
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                0x8f => self.push(Value::Set(Vec::new())),
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append_items(items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::FrozenSet(items));
                }
                // -- globals and calls --
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    self.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.push(Value::Global { module, name })
                        }
                        _ => return Err(self.err("module and name must be strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push_object(callable, args, ObjectKind::Reduce);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.push_object(cls, args, ObjectKind::NewObj);
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.push_object(cls, args, ObjectKind::NewObjEx { kwargs });
                }
                b'i' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let args = self.pop_mark()?;
                    self.push_object(
                        Value::Global { module, name },
                        Value::Tuple(args),
                        ObjectKind::Inst,
                    );
                }
                b'o' => {
                    let mut items = self.pop_mark()?.into_iter();
                    let cls = items
                        .next()
                        .ok_or_else(|| self.err("OBJ without a class"))?;
                    self.push_object(cls, Value::Tuple(items.collect()), ObjectKind::Inst);
                }
                b'b' => {
                    let state = self.pop()?;
                    self.with_top(|target| {
                        match target {
                            Value::Object(o) => o.state = Some(state),
                            other => {
                                let obj = std::mem::replace(other, Value::None);
                                *other = Value::Build {
                                    obj: Box::new(obj),
                                    state: Box::new(state),
                                };
                            }
                        }
                        Ok(())
                    })?;
                }
                b'P' => {
                    let id = self.line_str()?;
                    self.push(Value::PersistentId(Box::new(Value::Str(id))));
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Value::PersistentId(Box::new(id)));
                }
                // -- the memo --
                b'p' => {
                    let key = self.line_str()?;
                    let key = key.trim().parse().map_err(|_| self.err("malformed PUT"))?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = self.byte()?;
                    self.memo_put(u64::from(key))?;
                }
                b'r' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_put(u64::from(key))?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                b'g' => {
                    let key = self.line_str()?;
                    let key = key.trim().parse().map_err(|_| self.err("malformed GET"))?;
                    self.memo_get(key)?;
                }
                b'h' => {
                    let key = self.byte()?;
                    self.memo_get(u64::from(key))?;
                }
                b'j' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_get(u64::from(key))?;
                }
                _ => return Err(self.err("unsupported pickle opcode")),
            }
        }
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) | Value::BigInt(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a str",
        Value::Bytes(_) => "bytes",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Set(_) => "a set",
        Value::FrozenSet(_) => "a frozenset",
        Value::Global { .. } => "a global",
        Value::Object(_) => "an object",
        Value::Build { .. } => "a built object",
        Value::PersistentId(_) => "a persistent id",
    }
}

/// A little-endian two's complement integer (`LONG1`/`LONG4`): an [`Value::Int`] when it fits in
/// 64 bits, else a [`Value::BigInt`] holding the bytes.
fn int_from_le(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    // Drop redundant sign bytes, then see whether it fits.
    let mut n = bytes.len();
    while n > 1 && bytes[n - 1] == fill && (bytes[n - 2] & 0x80 != 0) == negative {
        n -= 1;
    }
    if n <= 8 {
        let mut a = [fill; 8];
        a[..n].copy_from_slice(&bytes[..n]);
        Value::Int(i64::from_le_bytes(a))
    } else {
        Value::BigInt(bytes[..n].to_vec())
    }
}

/// A protocol-0 decimal integer (`INT`, `LONG`), of any size.
fn parse_decimal(text: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(text).ok()?.trim();
    if let Ok(v) = text.parse::<i64>() {
        return Some(Value::Int(v));
    }
    let (negative, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Magnitude, little-endian base 256, plus one zero byte so the sign bit is clear.
    let mut mag: Vec<u8> = vec![0];
    for d in digits.bytes() {
        let mut carry = u32::from(d - b'0');
        for byte in mag.iter_mut() {
            let v = u32::from(*byte) * 10 + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    mag.push(0);
    if negative {
        // Two's complement: invert and add one.
        let mut carry = 1u16;
        for byte in mag.iter_mut() {
            let v = u16::from(!*byte) + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
    }
    Some(int_from_le(&mag))
}

/// The argument of protocol-0 `STRING`: a Python `repr` of a byte string, quotes included.
fn parse_quoted(line: &[u8]) -> Option<Vec<u8>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = if line.len() >= 2
        && (line[0] == b'\'' || line[0] == b'"')
        && line[line.len() - 1] == line[0]
    {
        &line[1..line.len() - 1]
    } else {
        return None;
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let e = *inner.get(i)?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let hex = std::str::from_utf8(inner.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// The argument of protocol-0 `UNICODE`: Python's `raw-unicode-escape` (latin-1 plus `\uXXXX`, `\UXXXXXXXX`).
fn raw_unicode_escape(line: &[u8]) -> String {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if b == b'\\' && i + 1 < line.len() && (line[i + 1] == b'u' || line[i + 1] == b'U') {
            let n = if line[i + 1] == b'u' { 4 } else { 8 };
            let ch = line
                .get(i + 2..i + 2 + n)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32);
            if let Some(ch) = ch {
                out.push(ch);
                i += 2 + n;
                continue;
            }
        }
        out.push(char::from(b));
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.to_string())
    }

    #[test]
    fn protocol_2_dict_with_memo_shared_after_mutation() {
        // d = {}; x = {'a': 1}; d['x'] = x; d['y'] = x  (pickle memoizes x before filling it)
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([b'X', 1, 0, 0, 0, b'x']);
        p.extend([b'}', b'q', 1, b'X', 1, 0, 0, 0, b'a', b'K', 1, b's']);
        p.extend([b'X', 1, 0, 0, 0, b'y', b'h', 1, b'u', b'.']);
        let out = load(&p).unwrap();
        let inner = Value::Dict(vec![(s("a"), Value::Int(1))]);
        assert_eq!(
            out.value,
            Value::Dict(vec![(s("x"), inner.clone()), (s("y"), inner)])
        );
        assert_eq!(out.end, p.len());
        assert_eq!(out.protocol, 2);
    }

    #[test]
    fn big_ints_and_small_ints() {
        // LONG1 with torch's legacy magic number 0x1950a86a20f9469cfc6c (80 bits).
        let p = [
            0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
        ];
        assert_eq!(
            load(&p).unwrap().value,
            Value::BigInt(vec![
                0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19
            ])
        );
        // LONG1 -1 and 255 (with a sign byte), BININT -2, BININT2 65535.
        let p = [
            b'(', 0x8a, 1, 0xff, 0x8a, 2, 0xff, 0x00, b'J', 0xfe, 0xff, 0xff, 0xff, b'M', 0xff,
            0xff, b't', b'.',
        ];
        assert_eq!(
            load(&p).unwrap().value,
            Value::Tuple(vec![
                Value::Int(-1),
                Value::Int(255),
                Value::Int(-2),
                Value::Int(65535)
            ])
        );
        // Protocol 0 text ints, one beyond 64 bits.
        let p = b"(I01\nI-7\nL123456789012345678901234567890L\nL-5L\nt.";
        let v = load(p).unwrap().value;
        let Value::Tuple(items) = v else {
            panic!("{v:?}")
        };
        assert_eq!(items[0], Value::Bool(true));
        assert_eq!(items[1], Value::Int(-7));
        // 123456789012345678901234567890 = 0x18EE90FF6C373E0EE4E3F0AD2
        assert_eq!(
            items[2],
            Value::BigInt(vec![
                0xd2, 0x0a, 0x3f, 0x4e, 0xee, 0xe0, 0x73, 0xc3, 0xf6, 0x0f, 0xe9, 0x8e, 0x01
            ])
        );
        assert_eq!(items[3], Value::Int(-5));
    }

    #[test]
    fn protocol_0_text_opcodes() {
        let p = b"(S'a\\'b\\n'\nVcaf\\u00e9\nF1.5\ncmod\nname\n(dp0\nS'k'\np1\nI3\nsg1\n(l(I1\nI2\nimod\nC\nt.";
        let v = load(p).unwrap().value;
        let Value::Tuple(items) = v else {
            panic!("{v:?}")
        };
        assert_eq!(items[0], s("a'b\n"));
        assert_eq!(items[1], s("café"));
        assert_eq!(items[2], Value::Float(1.5));
        assert_eq!(
            items[3],
            Value::Global {
                module: "mod".into(),
                name: "name".into()
            }
        );
        assert_eq!(items[4], Value::Dict(vec![(s("k"), Value::Int(3))]));
        assert_eq!(items[5], s("k"));
        assert_eq!(items[6], Value::List(vec![]));
        let Value::Object(o) = &items[7] else {
            panic!("{:?}", items[7])
        };
        assert_eq!(o.callable.as_global(), Some(("mod", "C")));
        assert_eq!(o.args, Value::Tuple(vec![Value::Int(1), Value::Int(2)]));
        assert_eq!(o.kind, ObjectKind::Inst);
        assert_eq!(items.len(), 8);
    }

    #[test]
    fn protocol_4_sets_frames_bytes_and_objects() {
        let mut p = vec![0x80, 4, 0x95];
        p.extend(0u64.to_le_bytes());
        p.extend([0x8f, 0x94, b'(', b'K', 1, b'K', 2, 0x90]); // {1, 2}
        p.extend([b'(', b'K', 3, 0x91]); // frozenset({3})
        p.extend([b'C', 2, 0xde, 0xad]); // b'\xde\xad'
        p.extend([0x8c, 1, b'm', 0x8c, 1, b'C', 0x93, 0x94]); // m.C
        p.extend([b')', 0x81, b'}', b'X', 1, 0, 0, 0, b'z', 0x88, b's', b'b']); // C.__new__(C); BUILD {'z': True}
        p.extend([b'h', 1, b')', b'}', 0x92]); // NEWOBJ_EX(C, (), {})
        p.extend([0x87, b'0', 0x86, b'.']); // tuple3, pop, tuple2 over the rest
        let v = load(&p).unwrap().value;
        let Value::Tuple(items) = v else {
            panic!("{v:?}")
        };
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], Value::Set(vec![Value::Int(1), Value::Int(2)]));
        assert_eq!(items[1], Value::FrozenSet(vec![Value::Int(3)]));
    }

    #[test]
    fn reduce_then_setitems_and_build_reach_the_object() {
        let mut p = vec![0x80, 2, b'c'];
        p.extend(b"collections\nOrderedDict\n");
        p.extend([
            b')', b'R', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'w', b'K', 9, b'u',
        ]);
        p.extend([b'}', b'b', b'h', 0, 0x86, b'.']);
        let v = load(&p).unwrap().value;
        let Value::Tuple(items) = v else {
            panic!("{v:?}")
        };
        assert_eq!(items[0], items[1]);
        let Value::Object(o) = &items[0] else {
            panic!()
        };
        assert_eq!(o.callable.as_global(), Some(("collections", "OrderedDict")));
        assert_eq!(o.dict_items, vec![(s("w"), Value::Int(9))]);
        assert_eq!(o.state, Some(Value::Dict(vec![])));
        assert_eq!(o.kind, ObjectKind::Reduce);
    }

    #[test]
    fn self_reference_is_a_snapshot_not_a_loop() {
        // l = []; l.append(l)
        let p = [0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
        assert_eq!(
            load(&p).unwrap().value,
            Value::List(vec![Value::List(vec![])])
        );
    }

    #[test]
    fn errors_name_opcode_and_offset() {
        let e = load(&[0x80, 2, 0xff]).unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.to_string().contains("0xff"), "{e}");
        let e = load(&[0x80, 2, b'X', 10, 0, 0, 0, b'a']).unwrap_err();
        assert!(e.msg.contains("truncated"), "{e}");
        assert!(e.msg.contains("BINUNICODE"), "{e}");
        let e = load(&[0x80, 2, b'N']).unwrap_err();
        assert!(e.msg.contains("truncated"), "{e}");
        assert!(load(b".").unwrap_err().msg.contains("underflow"));
        assert!(load(&[b'h', 3, b'.'])
            .unwrap_err()
            .msg
            .contains("memo key 3"));
        assert!(load(b"u.").unwrap_err().msg.contains("MARK"));
        assert!(load(&[b'K', 1, b'K', 2, b'a', b'.'])
            .unwrap_err()
            .msg
            .contains("cannot append"));
        // Every prefix of a valid pickle fails cleanly.
        let p =
            b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G?\xf0\x00\x00\x00\x00\x00\x00eu.";
        assert!(load(p).is_ok());
        for n in 0..p.len() {
            assert!(load(&p[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn copy_budget_stops_exponential_expansion() {
        // x0 = [1]; x_{i+1} = [x_i, x_i] repeated: 2^60 nodes if expanded.
        let mut p = vec![0x80, 2, b']', b'K', 1, b'a', 0x94];
        for i in 0..60u32 {
            p.extend([b']', b'j']);
            p.extend(i.to_le_bytes());
            p.extend([b'a', b'j']);
            p.extend(i.to_le_bytes());
            p.extend([b'a', 0x94]);
        }
        p.push(b'.');
        let e = load(&p).unwrap_err();
        assert!(e.msg.contains("too large"), "{e}");
    }
}
