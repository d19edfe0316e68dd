// What the Winograd F(4x4, 3x3) kernels share: the input transform of one tile, in the forward
// pass (conv3x3_winograd4.cpp) and in grad_weight (conv3x3_winograd4_grad_weight.cpp).
#pragma once

// F(4x4, 3x3): V = B^T d B of one 6x6 input patch d (B in conv3x3_winograd4.cpp), as the body of
// the kernels' `omp simd` loops over patches: column q of d (q_ in COLUMN, an expression) is
// read at COLUMN[a * RS] for rows a = 0 .. 5; element xi = 6 i + q of V is written to
// (OUT)[xi * OS].  A macro, not a function: OpenMP lowers a simd loop before gcc inlines, and
// the patch's temporaries must be the loop body's own to vectorise as they did (an inlined
// function's version of this loop ran 15-20% slower).
#define PYCNN_WINOGRAD4_INPUT_TILE(T, COLUMN, RS, OUT, OS)                                          \
    do {                                                                                            \
        T t_[6][6]; /* B^T d: t_[i][q] for patch column q */                                        \
        for (int q_ = 0; q_ < 6; ++q_) {                                                            \
            const T* s_ = (COLUMN);                                                                 \
            const T d0 = s_[0], d1 = s_[(RS)], d2 = s_[2 * (RS)], d3 = s_[3 * (RS)], d4 = s_[4 * (RS)], \
                    d5 = s_[5 * (RS)];                                                              \
            const T a1 = d4 - T(4) * d2, a2 = d3 - T(4) * d1;                                       \
            const T b1 = d4 - d2, b2 = T(2) * (d3 - d1);                                            \
            t_[0][q_] = T(4) * d0 - T(5) * d2 + d4;                                                 \
            t_[1][q_] = a1 + a2;                                                                    \
            t_[2][q_] = a1 - a2;                                                                    \
            t_[3][q_] = b1 + b2;                                                                    \
            t_[4][q_] = b1 - b2;                                                                    \
            t_[5][q_] = T(4) * d1 - T(5) * d3 + d5;                                                 \
        }                                                                                           \
        for (int i_ = 0; i_ < 6; ++i_) { /* (B^T d) B */                                            \
            const T d0 = t_[i_][0], d1 = t_[i_][1], d2 = t_[i_][2], d3 = t_[i_][3], d4 = t_[i_][4],  \
                    d5 = t_[i_][5];                                                                 \
            const T a1 = d4 - T(4) * d2, a2 = d3 - T(4) * d1;                                       \
            const T b1 = d4 - d2, b2 = T(2) * (d3 - d1);                                            \
            T* o_ = (OUT) + 6 * i_ * (OS);                                                          \
            o_[0] = T(4) * d0 - T(5) * d2 + d4;                                                     \
            o_[(OS)] = a1 + a2;                                                                     \
            o_[2 * (OS)] = a1 - a2;                                                                 \
            o_[3 * (OS)] = b1 + b2;                                                                 \
            o_[4 * (OS)] = b1 - b2;                                                                 \
            o_[5 * (OS)] = T(4) * d1 - T(5) * d3 + d5;                                              \
        }                                                                                           \
    } while (0)
