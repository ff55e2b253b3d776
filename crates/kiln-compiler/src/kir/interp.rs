//! Runs a [`Function`] on the CPU with WGSL's semantics (wrapping integer arithmetic, a
//! division by zero giving the dividend and a remainder by zero zero, saturating float to
//! integer conversions, `i32`/`u32` conversions keeping the bits), so that an op's definition
//! and a schedule's rewrite of it can be checked against the reference executor without a
//! device.

mod workgroup;

use std::collections::HashMap;

use super::module::{Item, Module};
use super::wgsl::Callee;
use super::{
    BinOp, Block, ChunkBound, Expr, ExprKind, Function, Literal, MathFn, Scalar, Stmt, Ty, UnOp,
    ValidationError, validate,
};

/// A scalar value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    F32(f32),
    U32(u32),
    I32(i32),
    Bool(bool),
}

/// A value of the kernel IR: a scalar, four lanes, or an array of either.
#[derive(Clone, Debug, PartialEq)]
pub enum Lanes {
    Scalar(Value),
    Vec4([Value; 4]),
    Array(std::rc::Rc<[Lanes]>),
}

impl Lanes {
    pub fn f32(&self) -> Option<f32> {
        match self {
            Lanes::Scalar(Value::F32(x)) => Some(*x),
            _ => None,
        }
    }

    /// Lane `k` (a scalar is every lane).
    pub fn lane(&self, k: usize) -> Value {
        match self {
            Lanes::Scalar(v) => *v,
            Lanes::Vec4(l) => l[k],
            Lanes::Array(_) => unreachable!("validated: an array is no lanes"),
        }
    }

    fn map(&self, f: impl Fn(Value) -> Value) -> Lanes {
        match self {
            Lanes::Scalar(v) => Lanes::Scalar(f(*v)),
            Lanes::Vec4(l) => Lanes::Vec4(l.map(f)),
            Lanes::Array(_) => unreachable!("validated: no arithmetic on arrays"),
        }
    }

    /// `f` lane by lane, a scalar shared by the lanes of the other operand.
    fn zip(&self, other: &Lanes, f: impl Fn(Value, Value) -> Value) -> Lanes {
        match (self, other) {
            (Lanes::Scalar(a), Lanes::Scalar(b)) => Lanes::Scalar(f(*a, *b)),
            _ => Lanes::Vec4(std::array::from_fn(|k| f(self.lane(k), other.lane(k)))),
        }
    }
}

/// What the function reads besides its index: operand elements, the chunk's images, buffers
/// (by the global's name) and, in an entry point, the invocation id.
pub trait Env {
    fn operand(&mut self, k: usize, index: u32) -> Lanes;
    /// Operand `k` at `index` with the values of its extra parameters.
    fn call(&mut self, k: usize, index: u32, extra: &[Lanes]) -> Lanes {
        assert!(
            extra.is_empty(),
            "operand {k} takes no extra parameters here"
        );
        self.operand(k, index)
    }
    fn chunk(&self, bound: ChunkBound) -> u32;
    fn window_base(&self, w: usize) -> u32 {
        unreachable!("no window {w} in this environment")
    }
    fn load(&mut self, global: &str, index: u32) -> Lanes {
        unreachable!("no buffer {global}[{index}] in this environment")
    }
    fn store(&mut self, global: &str, index: u32, value: Lanes) {
        unreachable!("no buffer {global}[{index}] = {value:?} in this environment")
    }
    fn global_id(&self) -> [u32; 2] {
        unreachable!("not an entry point's environment")
    }
    fn local_index(&self) -> u32 {
        unreachable!("not a workgroup's environment")
    }
    /// `workgroupBarrier()`: waits for every invocation of the workgroup.
    fn barrier(&mut self) -> Result<(), EvalError> {
        Err(EvalError::Module(
            "a workgroup barrier outside a workgroup's run (`Runner::run_workgroup`)".into(),
        ))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("kernel IR: the function ran past {0} loop iterations")]
    TooLong(u64),
    #[error("kernel IR: {global}[{index}] is out of bounds ({len} elements)")]
    OutOfBounds {
        global: String,
        index: u32,
        len: usize,
    },
    #[error("kernel IR: {0}")]
    Module(String),
}

/// A module's buffers while it runs: each global's elements as flat scalars (a `vec4` array
/// holds four per element), by the global's name.
pub type Buffers = HashMap<String, Vec<Value>>;

/// Where an invocation's loads and stores go: a module's buffers, one invocation at a time,
/// or a workgroup's memory shared by its invocations (`workgroup::Invocation`).
trait Memory {
    /// Element `index` of `global`, `w` scalars wide.
    fn load(&mut self, global: &str, index: u32, w: usize) -> Result<Lanes, EvalError>;
    fn store(&mut self, global: &str, index: u32, value: &Lanes, w: usize)
    -> Result<(), EvalError>;
    /// The invocation's index in its workgroup, in a workgroup's run.
    fn local_index(&self) -> Option<u32> {
        None
    }
    fn barrier(&mut self) -> Result<(), EvalError> {
        Err(EvalError::Module(
            "a workgroup barrier outside a workgroup's run (`Runner::run_workgroup`)".into(),
        ))
    }
}

impl Memory for Buffers {
    fn load(&mut self, global: &str, index: u32, w: usize) -> Result<Lanes, EvalError> {
        read(self.get(global), global, index, w)
    }

    fn store(
        &mut self,
        global: &str,
        index: u32,
        value: &Lanes,
        w: usize,
    ) -> Result<(), EvalError> {
        write(self.get_mut(global), global, index, value, w)
    }
}

/// Zero of type `ty`, a scalar or four lanes (an array's elements).
fn zero(ty: Ty) -> Lanes {
    let (scalar, vec4) = match ty {
        Ty::Scalar(s) => (s, false),
        Ty::Vec4(s) => (s, true),
        Ty::Array { scalar, vec4, .. } => (scalar, vec4),
    };
    let z = match scalar {
        Scalar::F32 => Value::F32(0.0),
        Scalar::U32 => Value::U32(0),
        Scalar::I32 => Value::I32(0),
        Scalar::Bool => Value::Bool(false),
    };
    if vec4 {
        Lanes::Vec4([z; 4])
    } else {
        Lanes::Scalar(z)
    }
}

/// The buffer `global` (`data`, `None` if there is none) and where its element `index`, `w`
/// scalars wide, starts: bounds-checked.
fn locate<D: std::ops::Deref<Target = Vec<Value>>>(
    data: Option<D>,
    global: &str,
    index: u32,
    w: usize,
) -> Result<(D, usize), EvalError> {
    let Some(data) = data else {
        return Err(EvalError::Module(format!("no buffer `{global}`")));
    };
    let at = index as usize * w;
    if at + w > data.len() {
        return Err(EvalError::OutOfBounds {
            global: global.into(),
            index,
            len: data.len() / w,
        });
    }
    Ok((data, at))
}

/// Element `index` of `data`, the buffer `global` (`None`: no such buffer), bounds-checked.
fn read(data: Option<&Vec<Value>>, global: &str, index: u32, w: usize) -> Result<Lanes, EvalError> {
    let (data, at) = locate(data, global, index, w)?;
    Ok(if w == 4 {
        Lanes::Vec4([data[at], data[at + 1], data[at + 2], data[at + 3]])
    } else {
        Lanes::Scalar(data[at])
    })
}

/// Writes `value` to element `index` of `data`, as [`read`] reads it.
fn write(
    data: Option<&mut Vec<Value>>,
    global: &str,
    index: u32,
    value: &Lanes,
    w: usize,
) -> Result<(), EvalError> {
    let (data, at) = locate(data, global, index, w)?;
    for k in 0..w {
        data[at + k] = value.lane(k);
    }
    Ok(())
}

/// A module checked once, then run invocation by invocation (`run`).
pub struct Runner<'a> {
    module: &'a Module,
    library: Library<'a>,
}

impl<'a> Runner<'a> {
    /// Validates every function of `module`.
    pub fn new(module: &'a Module) -> Result<Runner<'a>, EvalError> {
        let mut library = Library::new(&module.items)?;
        validate(&module.entry.function)?;
        library.add_globals(&module.entry.function);
        Ok(Runner { module, library })
    }

    /// Runs one invocation of the entry point (global invocation id `gid`) over `buffers`, as
    /// the device would: every read and write bounds-checked, a read or write past a
    /// buffer's end an error (on a software GPU it corrupts the process; here it fails the
    /// test).
    pub fn run(&self, gid: [u32; 2], buffers: &mut Buffers) -> Result<(), EvalError> {
        self.run_in(gid, buffers, None)
    }

    /// [`Runner::run`] in `chunk`, for a chunked schedule (CPU-class image chunks).
    pub fn run_in(
        &self,
        gid: [u32; 2],
        buffers: &mut Buffers,
        chunk: Option<&ChunkTable>,
    ) -> Result<(), EvalError> {
        let entry = &self.module.entry;
        if !entry.workgroup.is_empty() {
            return Err(EvalError::Module(
                "a workgroup's entry point runs all its invocations at once \
                 (`Runner::run_workgroup`)"
                    .into(),
            ));
        }
        let mut error = None;
        let mut env = ModuleEnv {
            library: &self.library,
            callees: &entry.callees,
            values: Vec::new(),
            memory: buffers,
            gid,
            chunk,
            error: &mut error,
        };
        eval_valid(&entry.function, 0, &mut env)?;
        error.map_or(Ok(()), Err)
    }

    /// Runs the one workgroup of an entry point over `@builtin(local_invocation_index)` (the
    /// classifier head) over `buffers`: its invocations run at once, each on its own thread,
    /// meeting at every barrier, its workgroup arrays zeroed first as WGSL does. Besides the
    /// bounds, the run checks what a device leaves undefined: a barrier that not every
    /// invocation reaches, and a data race — an element of workgroup memory that one
    /// invocation writes and another reads or writes with no barrier between, or an element
    /// of a storage buffer that one invocation writes and another touches at all.
    pub fn run_workgroup(&self, buffers: &mut Buffers) -> Result<(), EvalError> {
        let entry = &self.module.entry;
        if entry.workgroup.is_empty() {
            return Err(EvalError::Module(
                "not a workgroup's entry point: it runs invocation by invocation (`Runner::run`)"
                    .into(),
            ));
        }
        let shared = workgroup::Shared::new(entry, buffers);
        std::thread::scope(|scope| {
            for lid in 0..entry.workgroup_size {
                let shared = &shared;
                scope.spawn(move || {
                    let mut memory = shared.invocation(lid);
                    let mut error = None;
                    let ran = eval_valid(
                        &entry.function,
                        0,
                        &mut ModuleEnv {
                            library: &self.library,
                            callees: &entry.callees,
                            values: Vec::new(),
                            memory: &mut memory,
                            gid: [lid, 0],
                            chunk: None,
                            error: &mut error,
                        },
                    );
                    memory.finish(ran.and_then(|_| error.map_or(Ok(()), Err)));
                });
            }
        });
        shared.result()
    }
}

/// The current chunk of a chunked schedule (CPU-class image chunks): the images it sums
/// over, and where each of its windows starts in the flat index of what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTable {
    pub first_invocation: u32,
    pub end_invocation: u32,
    pub first_image: u32,
    pub end_image: u32,
    pub window_bases: Vec<u32>,
}

/// The kernel IR functions of a list of items, checked once and called by name (a
/// schedule's lane and rows functions).
pub struct Library<'a> {
    fns: HashMap<&'a str, (&'a Function, &'a [Callee])>,
    elems: HashMap<&'a str, Ty>,
}

impl<'a> Library<'a> {
    pub fn new(items: &'a [Item]) -> Result<Library<'a>, EvalError> {
        let mut library = Library {
            fns: HashMap::new(),
            elems: HashMap::new(),
        };
        for (name, f, callees) in items.iter().map(Item::function) {
            validate(f)?;
            library.fns.insert(name, (f, callees));
            library.add_globals(f);
        }
        Ok(library)
    }

    fn add_globals(&mut self, f: &'a Function) {
        for g in &f.globals {
            self.elems.insert(&g.name, g.elem);
        }
    }

    /// Calls function `name` at element `index` with the values of its extra parameters,
    /// over `buffers` (bounds-checked), in `chunk` where the schedule is chunked.
    pub fn call(
        &self,
        name: &str,
        index: u32,
        params: &[Lanes],
        buffers: &mut Buffers,
        chunk: Option<&ChunkTable>,
    ) -> Result<Lanes, EvalError> {
        let callees = [Callee::Call(name.to_string())];
        let mut error = None;
        let mut env = ModuleEnv {
            library: self,
            callees: &callees,
            values: Vec::new(),
            memory: buffers,
            gid: [0, 0],
            chunk,
            error: &mut error,
        };
        let value = env.call(0, index, params);
        error.map_or(Ok(value), Err)
    }
}

struct ModuleEnv<'a> {
    library: &'a Library<'a>,
    callees: &'a [Callee],
    /// The extra parameters of the function being run, by name, with their values (what a
    /// `Callee::Value` or `Callee::CallWith` names).
    values: Vec<(&'a str, Lanes)>,
    memory: &'a mut dyn Memory,
    gid: [u32; 2],
    chunk: Option<&'a ChunkTable>,
    /// The first error, reported after the invocation (`Env` reads cannot fail).
    error: &'a mut Option<EvalError>,
}

impl ModuleEnv<'_> {
    fn fail(&mut self, e: EvalError) -> Lanes {
        self.error.get_or_insert(e);
        Lanes::Scalar(Value::F32(0.0))
    }

    fn width(&self, global: &str) -> usize {
        match self.library.elems.get(global) {
            Some(Ty::Vec4(_)) => 4,
            _ => 1,
        }
    }
}

impl Env for ModuleEnv<'_> {
    fn operand(&mut self, k: usize, index: u32) -> Lanes {
        self.call(k, index, &[])
    }

    fn call(&mut self, k: usize, index: u32, extra: &[Lanes]) -> Lanes {
        let value = |env: &ModuleEnv, name: &str| {
            env.values
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        let (name, extra) = match &self.callees[k] {
            Callee::Call(name) => (name, extra.to_vec()),
            Callee::CallWith(name, with) => match value(self, with) {
                Some(v) => (name, [extra, &[v]].concat()),
                None => return self.fail(EvalError::Module(format!("no parameter `{with}`"))),
            },
            Callee::Value(name) => {
                return match value(self, name) {
                    Some(v) => v,
                    None => self.fail(EvalError::Module(format!("no parameter `{name}`"))),
                };
            }
        };
        let Some(&(f, callees)) = self.library.fns.get(name.as_str()) else {
            return self.fail(EvalError::Module(format!("no function `{name}`")));
        };
        let mut inner = ModuleEnv {
            library: self.library,
            callees,
            values: f
                .params
                .iter()
                .map(|(n, _)| n.as_str())
                .zip(extra.iter().cloned())
                .collect(),
            memory: &mut *self.memory,
            gid: self.gid,
            chunk: self.chunk,
            error: &mut *self.error,
        };
        match eval_with(f, index, &extra, &mut inner) {
            Ok(Some(v)) => v,
            Ok(None) => self.fail(EvalError::Module(format!("`{name}` returns nothing"))),
            Err(e) => self.fail(e),
        }
    }

    fn chunk(&self, bound: ChunkBound) -> u32 {
        match (self.chunk, bound) {
            (Some(c), ChunkBound::FirstInvocation) => c.first_invocation,
            (Some(c), ChunkBound::EndInvocation) => c.end_invocation,
            (Some(c), ChunkBound::FirstImage) => c.first_image,
            (Some(c), ChunkBound::EndImage) => c.end_image,
            (None, _) => unreachable!("a chunked function run without its chunk"),
        }
    }

    fn window_base(&self, w: usize) -> u32 {
        match self.chunk.and_then(|c| c.window_bases.get(w)) {
            Some(&base) => base,
            None => unreachable!("window {w} read without its chunk's base"),
        }
    }

    fn load(&mut self, global: &str, index: u32) -> Lanes {
        let w = self.width(global);
        match self.memory.load(global, index, w) {
            Ok(v) => v,
            Err(e) => {
                self.fail(e);
                // A stand-in of the element's type: the run goes on to report the error.
                let elem = self.library.elems.get(global).copied();
                zero(elem.unwrap_or(Ty::F32))
            }
        }
    }

    fn store(&mut self, global: &str, index: u32, value: Lanes) {
        let w = self.width(global);
        if let Err(e) = self.memory.store(global, index, &value, w) {
            self.fail(e);
        }
    }

    fn local_index(&self) -> u32 {
        self.memory
            .local_index()
            .expect("Runner::run refuses a workgroup's entry point")
    }

    fn barrier(&mut self) -> Result<(), EvalError> {
        self.memory.barrier()
    }

    fn global_id(&self) -> [u32; 2] {
        self.gid
    }
}

/// Runs `f` for element `index` (validating it first); an entry point returns `None`.
pub fn eval(f: &Function, index: u32, env: &mut dyn Env) -> Result<Option<Lanes>, EvalError> {
    validate(f)?;
    eval_valid(f, index, env)
}

/// [`eval`] of a function already validated (a module's functions, evaluated per element).
pub fn eval_valid(f: &Function, index: u32, env: &mut dyn Env) -> Result<Option<Lanes>, EvalError> {
    eval_with(f, index, &[], env)
}

/// [`eval_valid`] of a function with extra parameters, given their values.
pub fn eval_with(
    f: &Function,
    index: u32,
    params: &[Lanes],
    env: &mut dyn Env,
) -> Result<Option<Lanes>, EvalError> {
    if params.len() != f.params.len() {
        return Err(EvalError::Module(format!(
            "{} values for {} parameters",
            params.len(),
            f.params.len()
        )));
    }
    let mut m = Machine {
        f,
        index,
        params,
        env,
        locals: vec![None; f.locals.len()],
        arrays: vec![Vec::new(); f.locals.len()],
        steps: 0,
    };
    match m.block(&f.body)? {
        Flow::Return(v) => Ok(v),
        _ if f.ret.is_none() => Ok(None),
        _ => unreachable!("validated: every path returns"),
    }
}

/// Iterations one evaluation may run: a runaway loop is an error, not a hang.
const MAX_STEPS: u64 = 1 << 28;

enum Flow {
    Next,
    Continue,
    Return(Option<Lanes>),
}

struct Machine<'a> {
    f: &'a Function,
    index: u32,
    params: &'a [Lanes],
    env: &'a mut dyn Env,
    locals: Vec<Option<Lanes>>,
    /// Elements of the array locals.
    arrays: Vec<Vec<Lanes>>,
    steps: u64,
}

impl Machine<'_> {
    fn block(&mut self, block: &Block) -> Result<Flow, EvalError> {
        for s in block {
            match self.stmt(s)? {
                Flow::Next => {}
                flow => return Ok(flow),
            }
        }
        Ok(Flow::Next)
    }

    fn stmt(&mut self, s: &Stmt) -> Result<Flow, EvalError> {
        match s {
            Stmt::Let { local, value } | Stmt::Var { local, value } => {
                self.locals[local.index()] = Some(self.expr(*value));
            }
            Stmt::Assign { local, op, value } => {
                let v = self.expr(*value);
                let v = match op {
                    None => v,
                    Some(op) => {
                        let old = self.locals[local.index()]
                            .clone()
                            .expect("validated: declared");
                        binary(*op, old, v)
                    }
                };
                self.locals[local.index()] = Some(v);
            }
            Stmt::For {
                counter,
                start,
                end,
                body,
                ..
            } => {
                let start = self.u32(*start);
                self.locals[counter.index()] = Some(Lanes::Scalar(Value::U32(start)));
                loop {
                    let c = self.locals[counter.index()].clone().expect("set");
                    let Lanes::Scalar(Value::U32(c)) = c else {
                        unreachable!("validated: counters are u32")
                    };
                    if c >= self.u32(*end) {
                        break;
                    }
                    self.steps += 1;
                    if self.steps > MAX_STEPS {
                        return Err(EvalError::TooLong(MAX_STEPS));
                    }
                    if let Flow::Return(v) = self.block(body)? {
                        return Ok(Flow::Return(v));
                    }
                    self.locals[counter.index()] =
                        Some(Lanes::Scalar(Value::U32(c.wrapping_add(1))));
                }
            }
            Stmt::If {
                cond,
                accept,
                reject,
            } => {
                let taken = match self.expr(*cond) {
                    Lanes::Scalar(Value::Bool(b)) => b,
                    _ => unreachable!("validated: conditions are bools"),
                };
                return self.block(if taken { accept } else { reject });
            }
            Stmt::Loop {
                counter,
                start,
                cond,
                step,
                halve,
                body,
            } => {
                let start = self.u32(*start);
                self.locals[counter.index()] = Some(Lanes::Scalar(Value::U32(start)));
                while self.expr(*cond) == Lanes::Scalar(Value::Bool(true)) {
                    self.steps += 1;
                    if self.steps > MAX_STEPS {
                        return Err(EvalError::TooLong(MAX_STEPS));
                    }
                    if let Flow::Return(v) = self.block(body)? {
                        return Ok(Flow::Return(v));
                    }
                    let Some(Lanes::Scalar(Value::U32(c))) = self.locals[counter.index()] else {
                        unreachable!("validated: counters are u32")
                    };
                    let k = self.u32(*step);
                    let next = if *halve {
                        c.checked_div(k).unwrap_or(c)
                    } else {
                        c.wrapping_add(k)
                    };
                    self.locals[counter.index()] = Some(Lanes::Scalar(Value::U32(next)));
                }
            }
            Stmt::VarArray { local } => {
                let decl = self.f.local(*local);
                let zero = Lanes::Scalar(match decl.ty.scalar() {
                    Scalar::F32 => Value::F32(0.0),
                    Scalar::U32 => Value::U32(0),
                    Scalar::I32 => Value::I32(0),
                    Scalar::Bool => Value::Bool(false),
                });
                let len = decl.array.expect("validated: arrays have a length") as usize;
                self.arrays[local.index()] = vec![zero; len];
            }
            Stmt::Update {
                local,
                index,
                lane,
                op,
                value,
            } => {
                let at = index.map(|i| self.u32(i) as usize);
                let v = self.expr(*value);
                let whole = self.locals[local.index()]
                    .clone()
                    .expect("validated: declared");
                let part = |old: &Lanes| -> Lanes {
                    let old_part = match lane {
                        Some(l) => Lanes::Scalar(old.lane(*l as usize)),
                        None => old.clone(),
                    };
                    let new = match op {
                        None => v.clone(),
                        Some(op) => binary(*op, old_part, v.clone()),
                    };
                    match (lane, old) {
                        (Some(l), Lanes::Vec4(lanes)) => {
                            let mut lanes = *lanes;
                            lanes[*l as usize] = new.lane(0);
                            Lanes::Vec4(lanes)
                        }
                        (Some(_), _) => unreachable!("validated: a lane of a vec4"),
                        (None, _) => new,
                    }
                };
                let updated = match (at, &whole) {
                    (Some(at), Lanes::Array(elements)) => {
                        let mut elements = elements.to_vec();
                        // WGSL clamps a dynamic index into the array.
                        let at = at.min(elements.len() - 1);
                        elements[at] = part(&elements[at]);
                        Lanes::Array(elements.into())
                    }
                    (Some(_), _) => unreachable!("validated: an element of an array"),
                    (None, _) => part(&whole),
                };
                self.locals[local.index()] = Some(updated);
            }
            Stmt::Block(body) => return self.block(body),
            Stmt::AssignElement {
                local,
                index,
                value,
            } => {
                let at = self.u32(*index) as usize;
                let v = self.expr(*value);
                let array = &mut self.arrays[local.index()];
                // WGSL clamps a dynamic index into the array.
                let at = at.min(array.len() - 1);
                array[at] = v;
            }
            Stmt::Barrier => self.env.barrier()?,
            Stmt::Comment(_) => {}
            Stmt::Continue => return Ok(Flow::Continue),
            Stmt::Return(value) => return Ok(Flow::Return(value.map(|v| self.expr(v)))),
            Stmt::Store {
                global,
                index,
                value,
            } => {
                let at = self.u32(*index);
                let v = self.expr(*value);
                self.env.store(&self.f.globals[*global].name, at, v);
            }
        }
        Ok(Flow::Next)
    }

    fn u32(&mut self, e: Expr) -> u32 {
        match self.expr(e) {
            Lanes::Scalar(Value::U32(n)) => n,
            _ => unreachable!("validated: a u32"),
        }
    }

    fn expr(&mut self, e: Expr) -> Lanes {
        match self.f.expr(e) {
            ExprKind::Literal(l) => Lanes::Scalar(match *l {
                Literal::F32(x) => Value::F32(x),
                Literal::U32(n) => Value::U32(n),
                Literal::I32(n) => Value::I32(n),
                Literal::Bool(b) => Value::Bool(b),
            }),
            ExprKind::Index => Lanes::Scalar(Value::U32(self.index)),
            ExprKind::Local(l) => self.locals[l.index()]
                .clone()
                .expect("validated: set before read"),
            ExprKind::Call { k, args } => {
                let k = *k;
                let args: Vec<Lanes> = args.clone().into_iter().map(|a| self.expr(a)).collect();
                let Lanes::Scalar(Value::U32(at)) = args[0] else {
                    unreachable!("validated: indices are u32")
                };
                self.env.call(k, at, &args[1..])
            }
            ExprKind::Param(k) => self.params[*k].clone(),
            ExprKind::Array(elements) => {
                let elements: Vec<Lanes> =
                    elements.clone().into_iter().map(|e| self.expr(e)).collect();
                Lanes::Array(elements.into())
            }
            ExprKind::Operand { k, index } => {
                let (k, index) = (*k, *index);
                let at = self.u32(index);
                self.env.operand(k, at)
            }
            ExprKind::Binary { op, left, right } => {
                let (op, left, right) = (*op, *left, *right);
                // `&&` and `||` do not evaluate their right side when the left decides.
                if matches!(op, BinOp::And | BinOp::Or) {
                    let l = self.expr(left) == Lanes::Scalar(Value::Bool(true));
                    if l == (op == BinOp::Or) {
                        return Lanes::Scalar(Value::Bool(l));
                    }
                    return self.expr(right);
                }
                let l = self.expr(left);
                let r = self.expr(right);
                binary(op, l, r)
            }
            ExprKind::Unary { op, operand } => {
                let op = *op;
                self.expr(*operand).map(|v| match (op, v) {
                    (UnOp::Neg, Value::F32(x)) => Value::F32(-x),
                    (UnOp::Neg, Value::I32(n)) => Value::I32(n.wrapping_neg()),
                    (UnOp::Not, Value::Bool(b)) => Value::Bool(!b),
                    _ => unreachable!("validated: {op:?} of {v:?}"),
                })
            }
            ExprKind::Math { fun, args } => {
                let fun = *fun;
                let args: Vec<Lanes> = args.clone().into_iter().map(|a| self.expr(a)).collect();
                let one = |f: fn(f32) -> f32| args[0].map(move |v| Value::F32(f(float(v))));
                match fun {
                    MathFn::Exp => one(f32::exp),
                    MathFn::Log => one(f32::ln),
                    MathFn::Sqrt => one(f32::sqrt),
                    MathFn::Tanh => one(f32::tanh),
                    MathFn::Clamp => {
                        let low = min_max(MathFn::Max, &args[0], &args[1]);
                        min_max(MathFn::Min, &low, &args[2])
                    }
                    MathFn::Max | MathFn::Min => min_max(fun, &args[0], &args[1]),
                    MathFn::Dot => {
                        let products =
                            (0..4).map(|k| float(args[0].lane(k)) * float(args[1].lane(k)));
                        Lanes::Scalar(Value::F32(products.sum()))
                    }
                }
            }
            ExprKind::Select {
                cond,
                accept,
                reject,
            } => {
                let (c, a, r) = (*cond, *accept, *reject);
                let (c, a, r) = (self.expr(c), self.expr(a), self.expr(r));
                match (&a, &c) {
                    (_, Lanes::Scalar(Value::Bool(b))) => {
                        if *b {
                            a
                        } else {
                            r
                        }
                    }
                    (Lanes::Vec4(_), Lanes::Vec4(cs)) => Lanes::Vec4(std::array::from_fn(|k| {
                        if cs[k] == Value::Bool(true) {
                            a.lane(k)
                        } else {
                            r.lane(k)
                        }
                    })),
                    _ => unreachable!("validated: select's condition"),
                }
            }
            ExprKind::Cast { to, value } => {
                let to = *to;
                self.expr(*value).map(|v| cast(to, v))
            }
            ExprKind::Splat(x) => {
                let x = *x;
                match self.expr(x) {
                    Lanes::Scalar(v) => Lanes::Vec4([v; 4]),
                    _ => unreachable!("validated: splat of a scalar"),
                }
            }
            ExprKind::Compose(lanes) => {
                let lanes = *lanes;
                Lanes::Vec4(lanes.map(|l| self.expr(l).lane(0)))
            }
            ExprKind::Chunk(bound) => Lanes::Scalar(Value::U32(self.env.chunk(*bound))),
            ExprKind::WindowBase(w) => Lanes::Scalar(Value::U32(self.env.window_base(*w))),
            ExprKind::Load { global, index } => {
                let (global, index) = (*global, *index);
                let at = self.u32(index);
                self.env.load(&self.f.globals[global].name, at)
            }
            ExprKind::Lane { vector, lane } => {
                let (vector, lane) = (*vector, *lane);
                let l = self.u32(lane);
                match self.expr(vector) {
                    // WGSL clamps a dynamic lane or array index out of range.
                    Lanes::Vec4(v) => Lanes::Scalar(v[(l as usize).min(3)]),
                    Lanes::Array(a) => a[(l as usize).min(a.len() - 1)].clone(),
                    // Only the stand-in for a failed read or call (reported after the run).
                    Lanes::Scalar(v) => Lanes::Scalar(v),
                }
            }
            ExprKind::GlobalId(axis) => {
                Lanes::Scalar(Value::U32(self.env.global_id()[*axis as usize]))
            }
            ExprKind::LocalIndex => Lanes::Scalar(Value::U32(self.env.local_index())),
            ExprKind::Element { local, index } => {
                let (local, index) = (*local, *index);
                let at = self.u32(index) as usize;
                let array = &self.arrays[local.index()];
                array[at.min(array.len() - 1)].clone()
            }
        }
    }
}

/// WGSL's `max` or `min`, lane by lane.
fn min_max(fun: MathFn, a: &Lanes, b: &Lanes) -> Lanes {
    let max = fun == MathFn::Max;
    a.zip(b, |a, b| match (a, b) {
        (Value::F32(a), Value::F32(b)) => Value::F32(if max { a.max(b) } else { a.min(b) }),
        (Value::U32(a), Value::U32(b)) => Value::U32(if max { a.max(b) } else { a.min(b) }),
        (Value::I32(a), Value::I32(b)) => Value::I32(if max { a.max(b) } else { a.min(b) }),
        _ => unreachable!("validated: {fun:?} of {a:?}, {b:?}"),
    })
}

fn float(v: Value) -> f32 {
    match v {
        Value::F32(x) => x,
        _ => unreachable!("validated: a float"),
    }
}

fn cast(to: Scalar, v: Value) -> Value {
    match (to, v) {
        (Scalar::F32, Value::F32(x)) => Value::F32(x),
        (Scalar::F32, Value::U32(n)) => Value::F32(n as f32),
        (Scalar::F32, Value::I32(n)) => Value::F32(n as f32),
        (Scalar::F32, Value::Bool(b)) => Value::F32(f32::from(u8::from(b))),
        // Rust's `as` saturates and sends NaN to 0, as WGSL's conversion does.
        (Scalar::U32, Value::F32(x)) => Value::U32(x as u32),
        (Scalar::U32, Value::U32(n)) => Value::U32(n),
        (Scalar::U32, Value::I32(n)) => Value::U32(n as u32),
        (Scalar::U32, Value::Bool(b)) => Value::U32(u32::from(b)),
        (Scalar::I32, Value::F32(x)) => Value::I32(x as i32),
        (Scalar::I32, Value::U32(n)) => Value::I32(n as i32),
        (Scalar::I32, Value::I32(n)) => Value::I32(n),
        (Scalar::I32, Value::Bool(b)) => Value::I32(i32::from(b)),
        (Scalar::Bool, Value::F32(x)) => Value::Bool(x != 0.0),
        (Scalar::Bool, Value::U32(n)) => Value::Bool(n != 0),
        (Scalar::Bool, Value::I32(n)) => Value::Bool(n != 0),
        (Scalar::Bool, Value::Bool(b)) => Value::Bool(b),
    }
}

fn binary(op: BinOp, l: Lanes, r: Lanes) -> Lanes {
    use std::cmp::Ordering;
    l.zip(&r, |a, b| {
        let ord = match (a, b) {
            (Value::F32(x), Value::F32(y)) => x.partial_cmp(&y),
            (Value::U32(x), Value::U32(y)) => Some(x.cmp(&y)),
            (Value::I32(x), Value::I32(y)) => Some(x.cmp(&y)),
            (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(&y)),
            _ => unreachable!("validated: {op:?} of {a:?}, {b:?}"),
        };
        let is = |want: &[Ordering]| Value::Bool(ord.is_some_and(|o| want.contains(&o)));
        match op {
            BinOp::Lt => is(&[Ordering::Less]),
            BinOp::Le => is(&[Ordering::Less, Ordering::Equal]),
            BinOp::Gt => is(&[Ordering::Greater]),
            BinOp::Ge => is(&[Ordering::Greater, Ordering::Equal]),
            BinOp::Eq => is(&[Ordering::Equal]),
            // NaN is unequal to everything, itself included.
            BinOp::Ne => Value::Bool(ord != Some(Ordering::Equal)),
            _ => arithmetic(op, a, b),
        }
    })
}

fn arithmetic(op: BinOp, a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => Value::F32(match op {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
            BinOp::Rem => x % y,
            _ => unreachable!("validated: {op:?} of floats"),
        }),
        (Value::U32(x), Value::U32(y)) => Value::U32(match op {
            BinOp::Add => x.wrapping_add(y),
            BinOp::Sub => x.wrapping_sub(y),
            BinOp::Mul => x.wrapping_mul(y),
            BinOp::Div => x.checked_div(y).unwrap_or(x),
            BinOp::Rem => x.checked_rem(y).unwrap_or(0),
            BinOp::BitAnd => x & y,
            BinOp::ShiftRight => x >> (y % 32),
            _ => unreachable!("validated: {op:?} of u32s"),
        }),
        (Value::I32(x), Value::I32(y)) => Value::I32(match op {
            BinOp::Add => x.wrapping_add(y),
            BinOp::Sub => x.wrapping_sub(y),
            BinOp::Mul => x.wrapping_mul(y),
            BinOp::Div => x.checked_div(y).unwrap_or(x),
            BinOp::Rem => x.checked_rem(y).unwrap_or(0),
            BinOp::BitAnd => x & y,
            _ => unreachable!("validated: {op:?} of i32s"),
        }),
        (Value::I32(x), Value::U32(y)) if op == BinOp::ShiftRight => Value::I32(x >> (y % 32)),
        (Value::Bool(x), Value::Bool(y)) if op == BinOp::BitAnd => Value::Bool(x & y),
        _ => unreachable!("validated: {op:?} of {a:?}, {b:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Builder, Ty};
    use super::*;

    struct Table(Vec<f32>);

    impl Env for Table {
        fn operand(&mut self, _: usize, index: u32) -> Lanes {
            Lanes::Scalar(Value::F32(self.0[index as usize]))
        }
        fn chunk(&self, bound: ChunkBound) -> u32 {
            match bound {
                ChunkBound::FirstImage => 1,
                ChunkBound::EndImage => 3,
                _ => unreachable!("the tests' chunks bound images only"),
            }
        }
    }

    #[test]
    fn a_strided_sum_skipping_odd_taps() {
        // Sums x[k * 2] over the chunk's images, skipping k == 2.
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (lo, hi) = (
            b.chunk(ChunkBound::FirstImage),
            b.chunk(ChunkBound::EndImage),
        );
        b.for_("k", lo, hi, |b, k| {
            let two = b.u32(2);
            let skip = b.bin(BinOp::Eq, k, two);
            b.continue_if(skip);
            let at = b.mul(k, two);
            let x = b.operand(0, at);
            b.add_assign(acc, x);
        });
        let a = b.get(acc);
        b.ret_(a);
        let f = b.finish();
        let got = eval(&f, 0, &mut Table((0..8).map(|x| x as f32).collect())).unwrap();
        assert_eq!(got.and_then(|l| l.f32()), Some(2.0));
    }

    #[test]
    fn wgsl_integer_semantics() {
        let mut b = Builder::new(Ty::U32, vec![]);
        let i = b.index();
        let zero = b.u32(0);
        let q = b.div(i, zero);
        let r = b.rem(i, zero);
        let s = b.add(q, r);
        let big = b.lit(Literal::U32(u32::MAX));
        let wrapped = b.add(s, big);
        b.ret_(wrapped);
        let f = b.finish();
        assert_eq!(
            eval(&f, 7, &mut Table(vec![])).unwrap(),
            Some(Lanes::Scalar(Value::U32(6)))
        );
    }

    #[test]
    fn lanes_share_scalars_and_select_per_lane() {
        let mut b = Builder::new(Ty::VEC4_F32, vec![Ty::VEC4_F32]);
        let i = b.index();
        let x = b.operand(0, i);
        let half = b.f32(0.5);
        let y = b.sub(x, half);
        let zero = b.f32(0.0);
        let z = b.splat(zero);
        let neg = b.bin(BinOp::Lt, y, z);
        let r = b.select(neg, z, y);
        b.ret_(r);
        let f = b.finish();
        struct Quad;
        impl Env for Quad {
            fn operand(&mut self, _: usize, _: u32) -> Lanes {
                Lanes::Vec4([0.0, 1.0, 0.25, 2.0].map(Value::F32))
            }
            fn chunk(&self, _: ChunkBound) -> u32 {
                0
            }
        }
        assert_eq!(
            eval(&f, 0, &mut Quad).unwrap(),
            Some(Lanes::Vec4([0.0, 0.5, 0.0, 1.5].map(Value::F32)))
        );
    }

    #[test]
    fn halving_loops_and_local_arrays() {
        // Sums 8 values by halving strides in a local array: 0 + 1 + ... + 7.
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let a = b.var_array("a", Ty::F32, 8);
        let (lo, hi) = (b.u32(0), b.u32(8));
        b.for_("k", lo, hi, |b, k| {
            let x = b.operand(0, k);
            b.assign_element(a, k, x);
        });
        let (four, two) = (b.u32(4), b.u32(2));
        let positive = |b: &mut Builder, s: Expr| {
            let z = b.u32(0);
            b.bin(BinOp::Gt, s, z)
        };
        b.loop_("stride", four, (&positive, two, true), |b, stride| {
            let lo = b.u32(0);
            b.for_("j", lo, stride, |b, j| {
                let other = b.add(j, stride);
                let (x, y) = (b.element(a, j), b.element(a, other));
                let sum = b.add(x, y);
                b.assign_element(a, j, sum);
            });
        });
        let zero = b.u32(0);
        let total = b.element(a, zero);
        b.ret_(total);
        let f = b.finish();
        let got = eval(&f, 0, &mut Table((0..8).map(|x| x as f32).collect())).unwrap();
        assert_eq!(got.and_then(|l| l.f32()), Some(28.0));
        // The same function prints as WGSL naga accepts.
        let text =
            crate::kir::wgsl::body(&f, &[crate::kir::wgsl::Callee::Call("v1".into())]).unwrap();
        assert!(
            text.contains("for (var stride = 4u; stride > 0u; stride = stride / 2u) {"),
            "{text}"
        );
        assert!(text.contains("var a: array<f32, 8>;"), "{text}");
    }
}
