# Rewrites a CUDA source of kernels/topk for emu.h (see run_emulated.sh): drops CUDA includes,
# turns KERNEL<<<cfg>>>(args); into EMU_LAUNCH(cfg, KERNEL(args)), dynamic shared memory into
# emu::DynSmem, and the cp.async PTX into emu::CpAsync / CpCommit / CpWait.
import re, sys
src = open(sys.argv[1]).read()
def drop(pat):
    global src
    src = re.sub(pat, '', src)
for inc in ['<cuda_bf16.h>', '<cuda_fp16.h>', '<cuda_runtime.h>', '<cuda_runtime_api.h>',
            '<cub/block/block_reduce.cuh>', '<cub/block/block_scan.cuh>']:
    src = src.replace('#include ' + inc + '\n', '')
src = src.replace('#include "kernels/common/cuda_check.h"\n', '')
src = '#include "emu.h"\n' + src
src = src.replace('extern __shared__ __align__(16) unsigned char smem[];',
                  'unsigned char* smem = emu::DynSmem<unsigned char>();')
src = src.replace('extern __shared__ __align__(16) float q_s[];', 'float* q_s = emu::DynSmem<float>();')
src = re.sub(r'const unsigned s = static_cast<unsigned>\(__cvta_generic_to_shared\(smem_dst\)\);\s*'
             r'asm volatile\("cp\.async\.cg\.shared\.global[^;]*;[^;]*;', 'emu::CpAsync(smem_dst, src);', src)
src = re.sub(r'asm volatile\("cp\.async\.commit_group;\\n" ::: "memory"\);', 'emu::CpCommit();', src)
src = re.sub(r'asm volatile\("cp\.async\.wait_group %0;\\n" ::"n"\(N\) : "memory"\);', 'emu::CpWait(N);', src)
# The PTX of the tensor-core scorer (string literals may be split by clang-format).
def asm(op, repl):
    global src
    src = re.sub(r'asm volatile\(\s*"' + op + r'.*?\);', repl, src, flags=re.S)
asm(r'mma\.sync', 'emu::MmaBf16(c, a, b);')
asm(r'ld\.global\.nc', 'v = *reinterpret_cast<const uint4*>(src);')
asm(r'griddepcontrol', '')  # programmatic dependent launch: blocks run in order here
assert 'asm volatile' not in src, 'asm left'
# Launches: NAME<<<cfg>>>(args);
out = []
i = 0
while True:
    j = src.find('<<<', i)
    if j < 0:
        out.append(src[i:]); break
    # statement start: after last ';', '{' or '}' before j
    k = max(src.rfind(';', 0, j), src.rfind('{', 0, j), src.rfind('}', 0, j)) + 1
    name = src[k:j].strip()
    e = src.find('>>>', j)
    cfg = src[j+3:e]
    # args in balanced parens
    a = src.find('(', e)
    depth = 0; m = a
    while True:
        if src[m] == '(': depth += 1
        elif src[m] == ')':
            depth -= 1
            if depth == 0: break
        m += 1
    args = src[a+1:m]
    semi = src.find(';', m)
    lead = src[k:j][:len(src[k:j]) - len(src[k:j].lstrip())]
    out.append(src[i:k] + lead + 'EMU_LAUNCH(' + cfg + ', ' + name + '(' + args + '))')
    i = semi
open(sys.argv[2], 'w').write(''.join(out))
